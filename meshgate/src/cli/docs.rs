//! `meshgate completions SHELL` and `meshgate man`: shell completions and the man page,
//! generated from the CLI definition itself (clap_complete, clap_mangen), so they never
//! disagree with `--help`. The Debian package ships both.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write `meshgate.1` and one `meshgate-<subcommand>.1` page per subcommand into this
    /// directory instead of printing `meshgate(1)` to stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(mut command: clap::Command, args: CompletionsArgs) -> Result<()> {
    let name = command.get_name().to_string();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
    Ok(())
}

/// Writes the man page(s).
pub fn man(command: clap::Command, args: ManArgs) -> Result<()> {
    match args.out_dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command).render(&mut out)?;
            use std::io::Write;
            std::io::stdout().write_all(&out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        }
    }
    Ok(())
}
