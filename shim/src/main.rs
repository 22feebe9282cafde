//! `rudder-shim --dir D --id ID --runtime R --root ROOT [--log-max-size N] [--log-max-files N]
//! [--hide-unified true]`:
//! started by the agent for each container (see the library's docs). Arguments are parsed by
//! hand: the point of this binary is to stay small, since one runs per container.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    // The agent passes the same arguments as to `rudder-agent shim …`.
    if args.peek().map(String::as_str) == Some("shim") {
        args.next();
    }
    let (mut dir, mut id, mut runtime, mut root) = (None, None, None, None);
    let mut log_max_size = rudder_shim::LOG_MAX_SIZE;
    let mut log_max_files = rudder_shim::LOG_MAX_FILES;
    let mut hide_unified = false;
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            usage(&format!("{flag} needs a value"));
        };
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value)),
            "--id" => id = Some(value),
            "--runtime" => runtime = Some(value),
            "--root" => root = Some(PathBuf::from(value)),
            "--log-max-size" => {
                log_max_size = value
                    .parse()
                    .unwrap_or_else(|_| usage("--log-max-size: a number of bytes"))
            }
            "--log-max-files" => {
                log_max_files = value
                    .parse()
                    .unwrap_or_else(|_| usage("--log-max-files: a number"))
            }
            "--hide-unified" => {
                hide_unified = value
                    .parse()
                    .unwrap_or_else(|_| usage("--hide-unified: true or false"))
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let (Some(dir), Some(id), Some(runtime), Some(root)) = (dir, id, runtime, root) else {
        usage("--dir, --id, --runtime and --root are required");
    };
    rudder_shim::main(rudder_shim::ShimArgs {
        dir,
        id,
        runtime,
        root,
        log_max_size,
        log_max_files,
        hide_unified,
    })
}

fn usage(why: &str) -> ! {
    eprintln!(
        "rudder-shim: {why}\nusage: rudder-shim --dir DIR --id ID --runtime RUNTIME --root ROOT \
         [--log-max-size BYTES] [--log-max-files N] [--hide-unified BOOL]"
    );
    std::process::exit(2)
}
