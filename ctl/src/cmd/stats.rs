//! `rctl stats [SERVICE|TASK ...] [--no-stream] [--all] [-o json|yaml] [--format T]`: live
//! usage of running tasks, like `docker stats`. The controller streams a frame every second,
//! each read by the tasks' hosts from their cgroups (see `controller::stats_api`); this module
//! only renders them: on a terminal the table is redrawn in place, otherwise one table (or one
//! JSON/YAML document) is printed per frame. `--no-stream` prints the first frame and exits.
//!
//! Units are docker's: memory in binary units with 4 significant digits (`1.5MiB / 7.6GiB`),
//! network and block I/O in decimal ones with 3 (`1.2kB / 648B`); CPU % is a percentage of
//! one cpu over the last interval (200% = two cpus busy).

use std::io::IsTerminal as _;

use futures::StreamExt as _;
use rudder_proto::v1::{LiveTaskStats, StatsFrame, StatsStreamRequest};

use super::print_table;
use crate::context::Context;
use crate::output::OutputFormat;

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Services or tasks (id, id prefix, name, SERVICE.SLOT); none: every running task.
    pub targets: Vec<String>,
    /// Print one snapshot and exit.
    #[arg(long)]
    pub no_stream: bool,
    /// Also show tasks that are not running.
    #[arg(short, long)]
    pub all: bool,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// A row template: `{{.Name}} {{.CPUPerc}}`; `table ` first for a header and aligned
    /// columns (`\t` between them). Fields: ID Name Node State CPUPerc MemUsage MemPerc NetIO
    /// BlockIO PIDs.
    #[arg(long)]
    pub format: Option<String>,
    /// Print JSON once (same as `-o json --no-stream`).
    #[arg(long, hide = true)]
    pub json: bool,
}

/// `x` with `precision` significant digits, trailing zeros dropped: C's `%.*g` for the
/// magnitudes units leave (below 10000). Pure.
pub fn sig_digits(x: f64, precision: usize) -> String {
    if x == 0.0 || !x.is_finite() {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor() as i64;
    let decimals = (precision as i64 - 1 - magnitude).max(0) as usize;
    let mut s = format!("{x:.decimals$}");
    // Rounding may add a digit (9.9996 → 10.000): one decimal fewer then.
    let digits = s.chars().filter(char::is_ascii_digit).count();
    if decimals > 0 && digits > precision && s.starts_with(|c: char| c != '0') {
        let d = decimals - 1;
        s = format!("{x:.d$}");
    }
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    s
}

fn scaled(bytes: u64, base: f64, units: &[&str], precision: usize) -> String {
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    format!("{}{}", sig_digits(v, precision), units[i])
}

/// Docker's `BytesSize`: `1.504MiB`. Pure.
pub fn binary_size(bytes: u64) -> String {
    scaled(
        bytes,
        1024.0,
        &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"],
        4,
    )
}

/// Docker's `HumanSizeWithPrecision(_, 3)`: `1.23MB`. Pure.
pub fn decimal_size(bytes: u64) -> String {
    scaled(bytes, 1000.0, &["B", "kB", "MB", "GB", "TB", "PB", "EB"], 3)
}

fn memory_percent(t: &LiveTaskStats) -> f64 {
    if t.memory_limit_bytes == 0 {
        0.0
    } else {
        t.memory_bytes as f64 * 100.0 / t.memory_limit_bytes as f64
    }
}

/// The text of field `name` (as `--format` names it) of a row; `None`: no such field. Pure.
pub fn field(t: &LiveTaskStats, name: &str) -> Option<String> {
    let none = || "--".to_string();
    let sampled = |f: &dyn Fn() -> String| if t.sampled { f() } else { none() };
    Some(match name {
        "ID" => t.task_id.clone(),
        "Name" => t.name.clone(),
        "Node" => t.node.clone(),
        "State" => t.state.clone(),
        "CPUPerc" => sampled(&|| format!("{:.2}%", t.cpu_percent)),
        "MemUsage" => sampled(&|| {
            format!(
                "{} / {}",
                binary_size(t.memory_bytes),
                binary_size(t.memory_limit_bytes)
            )
        }),
        "MemPerc" => sampled(&|| format!("{:.2}%", memory_percent(t))),
        "NetIO" => sampled(&|| {
            if t.has_network {
                format!(
                    "{} / {}",
                    decimal_size(t.net_rx_bytes),
                    decimal_size(t.net_tx_bytes)
                )
            } else {
                // The host's network: its counters are not the task's.
                "host".into()
            }
        }),
        "BlockIO" => sampled(&|| {
            format!(
                "{} / {}",
                decimal_size(t.block_read_bytes),
                decimal_size(t.block_write_bytes)
            )
        }),
        "PIDs" => sampled(&|| t.pids.to_string()),
        _ => return None,
    })
}

/// The table's columns: header and field.
const COLUMNS: [(&str, &str); 8] = [
    ("TASK", "Name"),
    ("NODE", "Node"),
    ("CPU %", "CPUPerc"),
    ("MEM USAGE / LIMIT", "MemUsage"),
    ("MEM %", "MemPerc"),
    ("NET I/O", "NetIO"),
    ("BLOCK I/O", "BlockIO"),
    ("PIDS", "PIDs"),
];

/// The default table's rows. Pure.
pub fn rows(frame: &StatsFrame) -> Vec<Vec<String>> {
    frame
        .tasks
        .iter()
        .map(|t| {
            COLUMNS
                .iter()
                .map(|(_, f)| field(t, f).unwrap_or_default())
                .collect()
        })
        .collect()
}

/// A `--format` template, parsed once: literal text and field names.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// `table `: a header and aligned columns.
    pub table: bool,
    /// Columns (split at tabs when `table`, else one): each a list of parts.
    pub columns: Vec<Vec<Part>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses `{{.Field}}` placeholders (spaces inside the braces allowed); `\t` (backslash,
    /// t) is a tab. Unknown fields and unclosed braces are refused. Pure.
    pub fn parse(src: &str) -> anyhow::Result<Template> {
        anyhow::ensure!(src.len() <= 4096, "--format: at most 4096 characters");
        let src = src.replace("\\t", "\t");
        let (table, body) = match src.strip_prefix("table") {
            Some(rest) => (true, rest.trim_start_matches(' ').to_string()),
            None => (false, src),
        };
        let parse_one = |text: &str| -> anyhow::Result<Vec<Part>> {
            let mut parts = Vec::new();
            let mut rest = text;
            while let Some(open) = rest.find("{{") {
                if open > 0 {
                    parts.push(Part::Text(rest[..open].to_string()));
                }
                let after = &rest[open + 2..];
                let close = after
                    .find("}}")
                    .ok_or_else(|| anyhow::anyhow!("--format: unclosed {{{{ in {text:?}"))?;
                let name = after[..close].trim();
                let name = name.strip_prefix('.').unwrap_or(name);
                let probe = LiveTaskStats::default();
                anyhow::ensure!(
                    field(&probe, name).is_some(),
                    "--format: no field {name:?} (fields: ID Name Node State CPUPerc MemUsage \
                     MemPerc NetIO BlockIO PIDs)"
                );
                parts.push(Part::Field(name.to_string()));
                rest = &after[close + 2..];
            }
            if !rest.is_empty() {
                parts.push(Part::Text(rest.to_string()));
            }
            Ok(parts)
        };
        let columns = if table {
            body.split('\t').map(parse_one).collect::<Result<_, _>>()?
        } else {
            vec![parse_one(&body)?]
        };
        Ok(Template { table, columns })
    }

    fn render(parts: &[Part], t: &LiveTaskStats) -> String {
        parts
            .iter()
            .map(|p| match p {
                Part::Text(s) => s.clone(),
                Part::Field(f) => field(t, f).unwrap_or_default(),
            })
            .collect()
    }

    /// The header of a `table` template: each column's fields in upper case, as docker
    /// names them. Pure.
    pub fn header(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Field(f) => Some(
                            COLUMNS
                                .iter()
                                .find(|(_, name)| name == f)
                                .map(|(h, _)| h.to_string())
                                .unwrap_or_else(|| f.to_uppercase()),
                        ),
                        Part::Text(_) => None,
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    /// One row's cells (one cell unless `table`). Pure.
    pub fn row(&self, t: &LiveTaskStats) -> Vec<String> {
        self.columns.iter().map(|c| Self::render(c, t)).collect()
    }
}

/// A row as JSON: raw numbers (bytes, percentages), `null` where there is no sample. Pure.
pub fn json_row(t: &LiveTaskStats) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": t.task_id, "name": t.name, "node": t.node, "state": t.state,
    });
    if t.sampled {
        let more = serde_json::json!({
            "cpu_percent": t.cpu_percent,
            // Thousandths of a cpu, as the leader's heartbeat samples count.
            "cpu_milli": (t.cpu_percent * 10.0).round() as u64,
            "memory_bytes": t.memory_bytes,
            "memory_limit_bytes": t.memory_limit_bytes,
            "memory_percent": memory_percent(t),
            "net_rx_bytes": t.has_network.then_some(t.net_rx_bytes),
            "net_tx_bytes": t.has_network.then_some(t.net_tx_bytes),
            "block_read_bytes": t.block_read_bytes,
            "block_write_bytes": t.block_write_bytes,
            "pids": t.pids,
        });
        if let (Some(o), serde_json::Value::Object(m)) = (v.as_object_mut(), more) {
            o.extend(m);
        }
    }
    v
}

/// Renders frames to stdout as the arguments ask.
struct Printer {
    output: OutputFormat,
    template: Option<Template>,
    once: bool,
    terminal: bool,
    frames: u64,
    last_warnings: Vec<String>,
}

impl Printer {
    fn print(&mut self, frame: &StatsFrame) -> anyhow::Result<()> {
        if frame.warnings != self.last_warnings {
            for w in &frame.warnings {
                eprintln!("warning: {w}");
            }
            self.last_warnings = frame.warnings.clone();
        }
        let json: Vec<serde_json::Value> = frame.tasks.iter().map(json_row).collect();
        match self.output {
            OutputFormat::Json if self.once => println!("{}", serde_json::to_string_pretty(&json)?),
            // A stream: one document per line.
            OutputFormat::Json => println!("{}", serde_json::to_string(&json)?),
            OutputFormat::Yaml => {
                if !self.once {
                    println!("---");
                }
                print!("{}", serde_yaml::to_string(&json)?);
            }
            OutputFormat::Table => {
                if self.terminal && !self.once {
                    // Clear the screen and go home, as docker stats does.
                    print!("\x1b[2J\x1b[H");
                } else if self.frames > 0 {
                    println!();
                }
                match &self.template {
                    Some(t) if t.table => {
                        let header = t.header();
                        let header: Vec<&str> = header.iter().map(String::as_str).collect();
                        let rows: Vec<Vec<String>> = frame.tasks.iter().map(|r| t.row(r)).collect();
                        print_table(&header, &rows);
                    }
                    Some(t) => {
                        for r in &frame.tasks {
                            println!("{}", t.row(r).concat());
                        }
                    }
                    None => {
                        let header: Vec<&str> = COLUMNS.iter().map(|(h, _)| *h).collect();
                        print_table(&header, &rows(frame));
                    }
                }
            }
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        self.frames += 1;
        Ok(())
    }
}

pub async fn run(ctx: &Context, args: &StatsArgs) -> anyhow::Result<()> {
    let (output, once) = if args.json {
        (OutputFormat::Json, true)
    } else {
        (args.output, args.no_stream)
    };
    let template = args.format.as_deref().map(Template::parse).transpose()?;
    anyhow::ensure!(
        template.is_none() || output == OutputFormat::Table,
        "--format and -o json|yaml do not go together"
    );
    let mut printer = Printer {
        output,
        template,
        once,
        terminal: std::io::stdout().is_terminal(),
        frames: 0,
        last_warnings: Vec::new(),
    };
    let mut client = crate::connect(ctx).await?;
    let mut frames = client
        .stats_stream(StatsStreamRequest {
            targets: args.targets.clone(),
            once,
            interval_ms: 0,
            all: args.all,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(crate::status_err)?;
        printer.print(&frame)?;
        if once {
            break;
        }
    }
    Ok(())
}

/// `rctl describe`'s lines for the autoscaler's last decisions (nothing when there are none).
pub fn print_decisions(decisions: &[rudder_proto::v1::AutoscaleDecision]) {
    if decisions.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    println!("Autoscale:");
    for d in decisions {
        println!(
            "  {:>6}s ago  scaled {}→{}: {}",
            now.saturating_sub(d.at_ms) / 1000,
            d.from,
            d.to,
            d.reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_dockers() {
        for (bytes, binary, decimal) in [
            (0, "0B", "0B"),
            (648, "648B", "648B"),
            (1000, "1000B", "1kB"),
            (1024, "1KiB", "1.02kB"),
            (1_234, "1.205KiB", "1.23kB"),
            (1_577_058, "1.504MiB", "1.58MB"),
            (8_194_555_904, "7.632GiB", "8.19GB"),
            (999_999, "976.6KiB", "1000kB"),
            (1_048_575, "1024KiB", "1.05MB"),
        ] {
            assert_eq!(binary_size(bytes), binary, "{bytes}");
            assert_eq!(decimal_size(bytes), decimal, "{bytes}");
        }
        assert_eq!(sig_digits(9.9996, 4), "10");
        assert_eq!(sig_digits(0.5, 3), "0.5");
    }

    fn busy() -> LiveTaskStats {
        LiveTaskStats {
            task_id: "abcd".into(),
            name: "burn.1.abcd".into(),
            node: "h1".into(),
            state: "running".into(),
            cpu_percent: 99.456,
            memory_bytes: 1_577_058,
            memory_limit_bytes: 8_194_555_904,
            has_network: true,
            net_rx_bytes: 1_234,
            net_tx_bytes: 648,
            block_read_bytes: 0,
            block_write_bytes: 4096,
            pids: 2,
            sampled: true,
        }
    }

    #[test]
    fn a_row_has_dockers_columns() {
        let idle = LiveTaskStats {
            name: "idle.1.x".into(),
            state: "running".into(),
            has_network: false,
            ..busy()
        };
        let gone = LiveTaskStats {
            name: "old.1.y".into(),
            state: "failed".into(),
            ..Default::default()
        };
        let r = rows(&StatsFrame {
            tasks: vec![busy(), idle, gone],
            warnings: vec![],
        });
        assert_eq!(
            r[0],
            [
                "burn.1.abcd",
                "h1",
                "99.46%",
                "1.504MiB / 7.632GiB",
                "0.02%",
                "1.23kB / 648B",
                "0B / 4.1kB",
                "2"
            ]
        );
        assert_eq!(r[1][5], "host");
        assert_eq!(r[2][2..], ["--", "--", "--", "--", "--", "--"]);
    }

    #[test]
    fn templates() {
        let t = Template::parse("{{.Name}}: {{ .CPUPerc }}").unwrap();
        assert!(!t.table);
        assert_eq!(t.row(&busy()).concat(), "burn.1.abcd: 99.46%");
        let t = Template::parse("table {{.Name}}\\t{{.MemUsage}}\\t{{.PIDs}}").unwrap();
        assert!(t.table);
        assert_eq!(t.header(), ["TASK", "MEM USAGE / LIMIT", "PIDS"]);
        assert_eq!(t.row(&busy()), ["burn.1.abcd", "1.504MiB / 7.632GiB", "2"]);
        assert!(Template::parse("{{.Nope}}").is_err());
        assert!(Template::parse("{{.Name").is_err());
    }

    #[test]
    fn json_rows_carry_raw_numbers() {
        let v = json_row(&busy());
        assert_eq!(v["cpu_milli"], 995);
        assert_eq!(v["memory_bytes"], 1_577_058);
        assert_eq!(v["net_rx_bytes"], 1_234);
        assert_eq!(v["pids"], 2);
        let host_net = json_row(&LiveTaskStats {
            has_network: false,
            ..busy()
        });
        assert!(host_net["net_rx_bytes"].is_null());
        let none = json_row(&LiveTaskStats::default());
        assert!(none.get("cpu_percent").is_none());
    }
}
