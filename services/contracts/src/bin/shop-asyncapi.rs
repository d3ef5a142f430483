//! Prints the event contract (`asyncapi.yaml`), generated from the services'
//! code; `--write FILE` writes it, `--check FILE` fails if FILE differs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// Generates the AsyncAPI 3 document of the checkout's events.
#[derive(Debug, Parser)]
#[command(name = "shop-asyncapi", version)]
struct Args {
    /// Write the document to this file instead of standard output.
    #[arg(long, conflicts_with = "check")]
    write: Option<PathBuf>,
    /// Compare this file with the document; exit 1 if they differ.
    #[arg(long)]
    check: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let document = shop_contracts::yaml()?;
    if let Some(path) = args.write {
        std::fs::write(&path, &document).with_context(|| format!("writing {}", path.display()))?;
    } else if let Some(path) = args.check {
        let committed = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if committed != document {
            eprintln!(
                "{} is not what the code publishes and binds; regenerate it with \
                 `cargo run -p shop-contracts --bin shop-asyncapi -- --write {}`",
                path.display(),
                path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    } else {
        print!("{document}");
    }
    Ok(ExitCode::SUCCESS)
}
