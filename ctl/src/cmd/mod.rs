//! One module per `rctl` command.

pub mod admin;
pub mod apply;
pub mod build;
pub mod cluster;
pub mod commit;
pub mod cp;
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

/// Output format shared by listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Prints rows as aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
