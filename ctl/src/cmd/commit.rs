//! `rctl commit TASK NAME[:TAG]`: a task's container changes (files added, changed and deleted
//! since it started) become one new layer over its image, stored in the cluster registry under
//! NAME:TAG (tag `latest` when none is given), like `docker commit`. The image keeps its base's
//! config (env, command, entrypoint, working dir) unless `--change` edits it. A running
//! container is paused while its changes are read (`--pause=false` leaves it running). Prints
//! the new image's digest and size.

use clap::{ArgAction, Args};
use rudder_image::Reference;
use rudder_proto::v1::CommitRequest;

use crate::context::Context;

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// A task as `rctl ps` shows it, its id or an id prefix (or a service with one running
    /// task).
    pub task: String,
    /// NAME[:TAG] (tag `latest` when none is given).
    pub reference: String,
    /// A Dockerfile instruction applied to the image's config: CMD, ENTRYPOINT, ENV, EXPOSE,
    /// HEALTHCHECK, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME or WORKDIR (repeatable).
    #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
    pub changes: Vec<String>,
    /// A comment for the new layer's history entry.
    #[arg(short, long, default_value = "")]
    pub message: String,
    /// The image's author, e.g. "Name <email>".
    #[arg(short, long, default_value = "")]
    pub author: String,
    /// Pause the container while its changes are read (`--pause=false` to leave it running).
    #[arg(short, long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub pause: bool,
}

pub async fn run(ctx: &Context, args: &CommitArgs) -> anyhow::Result<()> {
    // Refused here already, with the same words as the controller's.
    if let Err(rudder_image::ImageError::InvalidReference { reference, reason }) =
        Reference::parse(&args.reference)
    {
        anyhow::bail!("invalid reference {reference:?}: {reason}");
    }
    rudder_image::commit::parse_changes(&args.changes)?;
    let mut client = crate::connect(ctx).await?;
    let r = client
        .commit(CommitRequest {
            task: args.task.clone(),
            reference: args.reference.clone(),
            changes: args.changes.clone(),
            message: args.message.clone(),
            author: args.author.clone(),
            no_pause: !args.pause,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!(
        "{} {} ({} bytes; new layer {} bytes: {} changed, {} deleted)",
        r.reference, r.digest, r.size, r.layer_size, r.changed, r.deleted
    );
    Ok(())
}
