//! `meshgate demo`.

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`meshgate demo` is not built yet")
}
