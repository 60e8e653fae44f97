//! `meshgate gateway`.

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`meshgate gateway` is not built yet")
}
