//! `lbd`: the load balancer daemon and CLI.

use clap::Parser;

#[derive(Parser)]
#[command(name = "lbd", version, about = "XDP load balancer daemon")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("lbd: the daemon arrives with issue 3; see README.md");
}
