//! `skiff-control`: the control plane (API server, store, scheduler, controllers).
//!
//! The store and API server are not built yet; this binary says so instead of pretending.

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "skiff-control", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "skiff-control starting"
    );
    bail!(
        "the control plane's store and API server are not built yet; \
         skiff-control cannot serve a cluster in this version"
    )
}
