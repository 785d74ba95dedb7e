//! The `tollgate` binary: logging set-up and the command line; everything else is in the
//! library.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = tollgate::cli::Cli::parse();
    std::process::exit(tollgate::cli::main(cli));
}
