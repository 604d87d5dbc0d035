//! `pipefuse`: parallel Diffusion Transformer inference. This binary is the user's entry point:
//! `generate` runs a request on a cluster, `serve` serves one over HTTP (OpenAI's images API),
//! `plan` shows how a topology splits the work, `launch` runs the nodes of a multi-machine
//! cluster, `keygen` makes its certificates, `bench` measures. Logs go to stderr through
//! `tracing`; set `RUST_LOG` (e.g. `RUST_LOG=pipefuse=debug,model=debug`).

mod attach;
mod bench;
mod bench_pipeline;
mod bench_transport;
mod caption;
mod cluster_args;
mod devices;
mod generate;
mod http;
mod images;
mod keygen;
mod launch;
mod op_times;
mod output_file;
mod plan;
mod png_out;
mod serve;
mod serve_connection;
mod tensor_io;

use clap::{Parser, Subcommand};

/// Parallel Diffusion Transformer (DiT, PixArt, SD3, Flux) inference on CPUs and GPUs.
#[derive(Parser, Debug)]
#[command(name = "pipefuse", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate latents with a DiT or PixArt model on a cluster (a topology file, or N local
    /// CPU devices running PipeFusion).
    Generate(Box<generate::GenerateArgs>),
    /// Print a cluster's plan: who owns which layers, the patch table, bytes per step per link.
    Plan(plan::PlanArgs),
    /// Run one node of a multi-node cluster (--node NAME), or all of them as processes on this
    /// machine (--local); the coordinator's node runs the request given by the generate flags.
    Launch(Box<launch::LaunchArgs>),
    /// Create the cluster CA and one certificate per node, where the topology's `[tls] ca` and
    /// `nodes[i].cert` / `key` point (mutual TLS between nodes).
    Keygen(keygen::KeygenArgs),
    /// Serve a cluster over HTTP: OpenAI's images API (POST /v1/images/generations), a jobs API
    /// with live progress (SSE), Prometheus metrics, health checks and a web page at /.
    Serve(Box<http::ServeArgs>),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List this machine's devices: the CPU (model, cores, vector instructions) and the CUDA
    /// GPUs (name, memory, compute capability); exits non-zero, saying why, when there is no GPU.
    Devices,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    install_subscriber(matches!(
        &cli.command,
        Command::Bench(bench::BenchCommand::Forward(a)) if a.op_times()
    ));
    let res = match cli.command {
        Command::Generate(a) => generate::run(*a),
        Command::Plan(a) => plan::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Launch(a) => launch::run(*a),
        Command::Serve(a) => http::run(*a),
        Command::Bench(b) => bench::run(b),
        Command::Devices => devices::run(),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`); with `op_times`, also the per-op
/// span timer of `bench forward --op-times` (its spans only, whatever `RUST_LOG` says).
fn install_subscriber(op_times: bool) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let env =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(env);
    let ops = op_times.then(|| {
        op_times::OpTimes
            .with_filter(Targets::new().with_target(model::OP_TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry().with(logs).with(ops).init();
}

/// The error and its causes joined by ": ", skipping a cause whose text the message already
/// holds (many error types print their source themselves: "cannot read X: Is a directory").
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
