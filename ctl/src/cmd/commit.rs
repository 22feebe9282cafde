//! `rctl commit TASK NAME[:TAG]`: a task's container changes (files added, changed and deleted
//! since it started) become one new layer over its image, stored in the cluster registry under
//! NAME:TAG (tag `latest` when none is given), like `docker commit`. The image keeps its base's
//! config (env, command, entrypoint, working dir). Prints the new image's digest and size.

use rudder_image::Reference;
use rudder_proto::v1::CommitRequest;

use crate::context::Context;

pub async fn run(ctx: &Context, task: &str, reference: &str) -> anyhow::Result<()> {
    // Refused here already, with the same words as the controller's.
    if let Err(rudder_image::ImageError::InvalidReference { reference, reason }) =
        Reference::parse(reference)
    {
        anyhow::bail!("invalid reference {reference:?}: {reason}");
    }
    let mut client = crate::connect(ctx).await?;
    let r = client
        .commit(CommitRequest {
            task: task.to_string(),
            reference: reference.to_string(),
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
