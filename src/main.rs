//! The `tollgate` binary: logging set-up and the command line; everything else is in the
//! library.

use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = tollgate::cli::Cli::parse();
    std::process::exit(tollgate::cli::main(cli));
}
