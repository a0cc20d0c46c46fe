//! `cargo xtask`: build, test, bench and run the suite (matklad's xtask convention).
//! Every task checks its prerequisites first and installs what it can (as root, from
//! Debian, rustup and crates.io), saying what it does and what is missing.

mod bench;
mod prereqs;
mod run;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, benchmark and run the XDP web stack")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install (as root) or check every prerequisite, then exit.
    Setup,
    /// Build everything, including the eBPF objects (release).
    Build,
    /// Run every test: host unit tests, then the root-only data-plane and end-to-end tests.
    Test {
        /// Arguments passed on to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks, side by side with their references in one run (needs root).
    Bench,
    /// The whole stack in network namespaces, until Ctrl-C (needs root).
    Run {
        /// `--skb` (generic XDP instead of driver mode), `--l2` (L2 forwarding instead of IPIP).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => prereqs::ensure(prereqs::Need::All).map(|_| eprintln!("xtask: all prerequisites present")),
        Task::Build => prereqs::ensure(prereqs::Need::Build).and_then(|_| prereqs::cargo(&["build", "--release"])),
        Task::Test { args } => test::run(&args),
        Task::Bench => bench::run(),
        Task::Run { args } => run::run(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
