//! One module per `rctl` command.

pub mod admin;
pub mod apply;
pub mod build;
pub mod cluster;
pub mod commit;
pub mod cp;
pub mod dashboard;
pub mod describe;
pub mod events;
pub mod exec;
pub mod get;
pub mod image;
pub mod image_inspect;
pub mod image_ls;
pub mod inspect;
pub mod local;
pub mod login;
pub mod logs;
pub mod network;
pub mod node;
pub mod ps;
pub mod rebalance;
pub mod rm;
pub mod rollback;
pub mod run;
pub mod scale;
pub mod secret;
pub mod stack;
pub mod stats;
pub mod top;
pub mod volume;

/// A duration as people say it: "45s", "12m", "5h", "3d".
pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Prints rows as aligned columns on stdout (see [`crate::output::write_table`]).
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let stdout = std::io::stdout();
    // A closed stdout ends rctl quietly in `main`; a table is never half an error.
    let _ = crate::output::write_table(&mut stdout.lock(), header, rows);
}
