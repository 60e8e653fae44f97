//! `meshgate keygen`: create the node's overlay key file and print its address and key.

use std::path::PathBuf;

use meshgate_overlay::Identity;
use meshgate_overlay::identity::encode_hex;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Key file to create (mode 0600).
    #[arg(long = "key", default_value = "meshgate-node.key")]
    pub key: PathBuf,
    /// Replace an existing key file (the node gets a new address).
    #[arg(long)]
    pub force: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let id = if args.force || !args.key.exists() {
        let id = Identity::generate();
        id.save(&args.key, args.force)?;
        eprintln!("created {}", args.key.display());
        id
    } else {
        // Existing file: show what it holds (and refuse it if it is unsafe or malformed).
        let id = Identity::load(&args.key)?;
        eprintln!("{} exists (use --force to replace it)", args.key.display());
        id
    };
    println!("address    {}", id.address());
    println!("public_key {}", encode_hex(&id.public_key()));
    Ok(())
}
