//! `rctl top TASK [-o json|yaml]`: the processes of a task's container, as its host reads them
//! from `/proc` (see `agent::top`): pid on the host and in the container, user, cpu, memory,
//! state and command line.

use rudder_proto::v1::{ProcessInfo, TopRequest, TopResponse};

use super::print_table;
use crate::cmd::stats::binary_size;
use crate::context::Context;
use crate::output::OutputFormat;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The task: id, id prefix, name, SERVICE.SLOT, or a service with one running task.
    pub task: String,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Cpu time as ps prints it: `[D-]HH:MM:SS`. Pure.
pub fn cpu_time(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// The table's rows. Pure.
pub fn rows(processes: &[ProcessInfo]) -> Vec<Vec<String>> {
    processes
        .iter()
        .map(|p| {
            vec![
                p.host_pid.to_string(),
                if p.pid == 0 {
                    "-".into()
                } else {
                    p.pid.to_string()
                },
                match p.uid {
                    0 => "root".to_string(),
                    u => u.to_string(),
                },
                format!("{:.1}", p.cpu_percent),
                cpu_time(p.cpu_time_ms),
                binary_size(p.rss_bytes),
                p.state.clone(),
                p.command.clone(),
            ]
        })
        .collect()
}

/// The answer as JSON. Pure.
pub fn json(r: &TopResponse) -> serde_json::Value {
    serde_json::json!({
        "task_id": r.task_id, "name": r.name, "node": r.node,
        "truncated_at": (r.truncated_at > 0).then_some(r.truncated_at),
        "processes": r.processes.iter().map(|p| serde_json::json!({
            "host_pid": p.host_pid, "pid": p.pid, "ppid": p.ppid, "uid": p.uid,
            "state": p.state, "rss_bytes": p.rss_bytes, "cpu_time_ms": p.cpu_time_ms,
            "cpu_percent": p.cpu_percent, "command": p.command,
        })).collect::<Vec<_>>(),
    })
}

pub async fn run(ctx: &Context, args: &TopArgs) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .top(TopRequest {
            task: args.task.clone(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&json(&r))?),
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(&json(&r))?),
        OutputFormat::Table => {
            print_table(
                &[
                    "PID", "CPID", "USER", "%CPU", "TIME", "RSS", "STAT", "COMMAND",
                ],
                &rows(&r.processes),
            );
            if r.truncated_at > 0 {
                eprintln!("(only the first {} processes)", r.truncated_at);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_like_ps() {
        assert_eq!(cpu_time(0), "00:00:00");
        assert_eq!(cpu_time(3_723_999), "01:02:03");
        assert_eq!(cpu_time(90_061_000), "1-01:01:01");
        let p = ProcessInfo {
            host_pid: 4242,
            pid: 1,
            ppid: 4000,
            uid: 0,
            state: "R".into(),
            rss_bytes: 102_400,
            cpu_time_ms: 2000,
            cpu_percent: 98.76,
            command: "sh -c while :; do :; done".into(),
        };
        let unknown = ProcessInfo {
            pid: 0,
            uid: 1000,
            ..p.clone()
        };
        let r = rows(&[p, unknown]);
        assert_eq!(
            r[0],
            [
                "4242",
                "1",
                "root",
                "98.8",
                "00:00:02",
                "100KiB",
                "R",
                "sh -c while :; do :; done"
            ]
        );
        assert_eq!(r[1][1..3], ["-", "1000"]);
    }
}
