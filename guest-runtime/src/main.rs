//! `hearth-agent`: PID 1 of hearth's utility VM, or (with `serve`) a native
//! agent on a host for tests and benchmarks.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hearth_agent::{pid1, serve, service::Mode, Listen, Options};
use hearth_agent_protocol::transport::AGENT_PORT;

#[derive(Parser)]
#[command(
    name = "hearth-agent",
    version,
    about = "hearth's agent: runs OCI containers with libcontainer, served over ttrpc"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve natively on this machine (as root), without a VM.
    Serve {
        /// unix:/PATH or vsock:PORT
        #[arg(long)]
        listen: Listen,
        /// Where container state, bundles and console sockets go.
        #[arg(long, default_value = "/run/hearth-agent")]
        state_dir: PathBuf,
        /// A tracing filter, for example `info` or `hearth_agent=debug`.
        #[arg(long, default_value = DEFAULT_LOG)]
        log: String,
    },
}

/// libcgroups warns about every v1 controller the host lacks, per container.
const DEFAULT_LOG: &str = "info,libcgroups=error";

fn logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() {
    if std::process::id() == 1 {
        run_as_init();
    }
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve { listen, state_dir, log }) => {
            logging(&log);
            if let Err(e) = serve(Options { listen, state_dir, mode: Mode::Native }) {
                eprintln!("hearth-agent: {e:#}");
                std::process::exit(1);
            }
        }
        None => {
            eprintln!(
                "hearth-agent: not PID 1. It runs as the utility VM's init; on a host use `hearth-agent serve --listen unix:/PATH`."
            );
            std::process::exit(2);
        }
    }
}

/// PID 1: bring the VM up, serve on vsock, and never return.
fn run_as_init() -> ! {
    // Without /proc or cgroups no container can run: say why and stop the
    // VM, rather than hang.
    if let Err(e) = pid1::mount_filesystems() {
        eprintln!("hearth-agent: mounting the VM's filesystems failed: {e:#}");
        pid1::power_off();
    }
    let params = pid1::BootParams::from_kernel();
    logging(params.log.as_deref().unwrap_or(DEFAULT_LOG));
    if let Err(e) = pid1::init(&params) {
        tracing::error!("hearth-agent: bringing the VM up failed: {e:#}");
        pid1::power_off();
    }
    let opts = Options { listen: Listen::Vsock(AGENT_PORT), state_dir: "/run/hearth".into(), mode: Mode::Vm };
    if let Err(e) = serve(opts) {
        tracing::error!("hearth-agent: {e:#}");
    }
    pid1::power_off()
}
