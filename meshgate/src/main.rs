//! The `meshgate` binary: one executable, one subcommand per role ([`cli`]); each role is
//! assembled by the library's composition root, `meshgate::app`.

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

// Chosen by measurement (docs/performance.md, "Memory after load"): a minute after an h2load
// run, jemalloc with background threads had given the load's memory back (RSS 1.3-1.4x idle),
// mimalloc kept 2.1-2.4x idle in its arenas and glibc's malloc ~3x in per-thread arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc itself before `main` (the build adds
/// `background_thread:true`; `_RJEM_MALLOC_CONF` in the environment overrides both).
/// `tcache_gc_incr_bytes`: a thread's cache is garbage-collected every 1 MiB allocated instead
/// of every 64 KiB. Each collection is also held to one per 10 ms, so a busy gateway does
/// about as much collecting either way, but it checks the clock 16x less often; counted under
/// callgrind (where a request takes milliseconds, so nearly every check collected) it was 7-8 %
/// of a proxied request's instructions (docs/performance.md, "fourth round").
#[allow(unsafe_code)] // The symbol jemalloc reads its options from (a C `const char *`).
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 29] = b"tcache_gc_incr_bytes:1048576\0";

#[derive(Parser)]
#[command(
    name = "meshgate",
    version,
    about = "Public ingress for an encrypted IPv6 overlay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a public gateway node (TLS termination/passthrough into overlay workloads).
    Gateway(cli::gateway::Args),
    /// Run a standalone overlay node (TUN or userspace), or query a running one.
    Node(cli::node::Args),
    /// Start gateway, workload node and sample service on loopback, and print a curl command.
    Demo(cli::demo::Args),
    /// Create a node key file and print its overlay address and public key.
    Keygen(cli::keygen::Args),
    /// Manage name and domain reservations through a gateway's admin API.
    Reserve(cli::reserve::Args),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(cli::docs::CompletionsArgs),
    /// Print the man page (roff) to stdout, or write every page into a directory.
    Man(cli::docs::ManArgs),
    /// A fleet of gateways on etcd: status, import a standalone gateway, make a fleet key.
    Fleet(cli::fleet::Args),
}

/// mimalloc asks for transparent huge pages, so the first touch of its fresh memory zeroes
/// 2 MiB at a time: 50 new backend connections at once cost the gateway 89 ms of CPU (three
/// quarters of it clearing pages) and whole huge pages of RSS. With 4 KiB pages, memory is
/// zeroed (and held) only where buffers are actually used.
#[allow(unsafe_code)] // FFI: prctl has no safe wrapper in std.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes no pointers and changes only this process's
    // page policy; its result is ignored because the program works either way.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    // Generated from the CLI definition; no runtime needed.
    let command = match cli.command {
        Command::Completions(a) => return exit(cli::docs::completions(Cli::command(), a)),
        Command::Man(a) => return exit(cli::docs::man(Cli::command(), a)),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Gateway(a) => cli::gateway::run(a).await,
            Command::Node(a) => cli::node::run(a).await,
            Command::Demo(a) => cli::demo::run(a).await,
            Command::Keygen(a) => cli::keygen::run(a).await,
            Command::Reserve(a) => cli::reserve::run(a).await,
            Command::Completions(_) | Command::Man(_) => Ok(()),
            Command::Fleet(a) => cli::fleet::run(a).await,
        }
    });
    exit(result)
}

/// Exit status 0, or 1 with the error on stderr.
fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
