//! hearth's project tasks. `cargo xtask --help` lists them.

mod apt;
mod artefacts;
mod bench;
mod bench_agent;
mod bench_containerd;
mod bench_cri;
mod bench_devices;
mod bench_distro;
mod bench_docker;
mod bench_network;
mod cpio;
mod demo;
mod e2e;
mod fuzz;
mod guest;
mod images;
mod install;
mod kernel;
mod paths;
mod place;
mod setup;
mod sh;
mod testhost;
mod testrun;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::artefacts::Artefacts;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "hearth's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and build everything the project needs (idempotent, cached).
    Setup,
    /// Build (or find in the cache) the tuned guest kernel only.
    Kernel,
    /// Run all tests: unit and integration tests, every e2e suite, then every fuzz target briefly.
    Test,
    /// Run one end-to-end suite (in the test host where KVM is not hardware-backed),
    /// or only its tests whose names contain FILTER.
    E2e { suite: String, filter: Option<String> },
    /// Run one benchmark; it prints its figures beside a reference, as ratios.
    Bench { name: String },
    /// Run a container through containerd on the hearth runtime (booting the VM on first use)
    /// and show its kernel beside the host's.
    Demo,
    /// Install hearth-vmm, the shim, the kernel and the agent initramfs under /usr/local,
    /// and a first /etc/hearth/config.toml.
    Install,
    /// Run the fuzz targets (or one) for some seconds each; fails if one finds something.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// One target (virtio_blk, virtio_mmio); all when absent.
        target: Option<String>,
    },
    /// Run a shell command inside the test host (for debugging suites).
    Testhost {
        /// The test host's memory, MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u64,
        command: Vec<String>,
    },
    #[command(hide = true)]
    BenchInner { name: String },
    #[command(hide = true)]
    DemoInner,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Kernel => apt::ensure().and_then(|_| kernel::ensure()).map(|_| ()),
        Task::Test => testrun::run(),
        Task::E2e { suite, filter } => Artefacts::build().and_then(|a| e2e::run_one(&suite, filter.as_deref(), &a)),
        Task::Bench { name } => Artefacts::build().and_then(|a| bench::run(&name, &a)),
        Task::Demo => setup::run().and_then(|_| Artefacts::build()).and_then(|a| demo::run(&a)),
        Task::Install => setup::run().and_then(|_| Artefacts::build()).and_then(|a| install::run(&a)),
        Task::Fuzz { seconds, target } => fuzz::run(&target.into_iter().collect::<Vec<_>>(), seconds),
        Task::Testhost { memory, command } => testhost::assets().and_then(|assets| {
            let script = format!(
                "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n{}\n",
                command.join(" ")
            );
            let run = testhost::Run {
                name: "shell",
                script,
                memory_mib: memory,
                timeout: Duration::from_secs(3600),
                console: &testhost::stdout_console,
            };
            match testhost::run(assets, &run)? {
                0 => Ok(()),
                code => anyhow::bail!("the command exited with status {code}"),
            }
        }),
        Task::BenchInner { name } => bench::inner(&name),
        Task::DemoInner => demo::inner(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
