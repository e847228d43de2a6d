//! The ttrpc service: decodes each request, hands it to the container
//! registry or the system module, and turns failures into statuses the caller
//! can act on. A failed request never stops the agent.

use std::sync::Arc;
use std::time::Duration;

use hearth_agent_protocol::agent::*;
use hearth_agent_protocol::agent_ttrpc::Agent;
use ttrpc::TtrpcContext;

use crate::container::Containers;
use crate::error::AgentError;
use crate::system;

/// Where the agent runs, which decides what "shut down" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the utility VM: shutting down powers the VM off.
    Vm,
    /// A process on a host: shutting down ends the process.
    Native,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Vm => "vm",
            Mode::Native => "native",
        }
    }
}

pub struct AgentService {
    pub containers: Arc<Containers>,
    pub mode: Mode,
    /// Runs after `Shutdown` has answered.
    pub on_shutdown: Arc<dyn Fn() + Send + Sync>,
}

type R<T> = ttrpc::Result<T>;

fn log_err<T>(call: &str, r: Result<T, AgentError>) -> R<T> {
    r.map_err(|e| {
        tracing::warn!("{call}: {e}");
        e.into()
    })
}

impl Agent for AgentService {
    fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> R<CreateContainerResponse> {
        let pid = log_err("CreateContainer", self.containers.create(&req))?;
        Ok(CreateContainerResponse { pid, ..Default::default() })
    }

    fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        log_err("StartContainer", self.containers.start(&req.container_id))?;
        Ok(Empty::new())
    }

    fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> R<ExecProcessResponse> {
        let pid = log_err("ExecProcess", self.containers.exec(&req))?;
        Ok(ExecProcessResponse { pid, ..Default::default() })
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> R<Empty> {
        log_err("SignalProcess", self.containers.signal(&req.container_id, &req.exec_id, req.signal, req.all))?;
        Ok(Empty::new())
    }

    fn wait_process(&self, _: &TtrpcContext, req: ProcessRequest) -> R<WaitProcessResponse> {
        log_err("WaitProcess", self.containers.wait(&req.container_id, &req.exec_id))
    }

    fn delete_container(&self, _: &TtrpcContext, req: DeleteContainerRequest) -> R<Empty> {
        log_err("DeleteContainer", self.containers.delete(&req.container_id, req.force))?;
        Ok(Empty::new())
    }

    fn delete_process(&self, _: &TtrpcContext, req: ProcessRequest) -> R<Empty> {
        log_err("DeleteProcess", self.containers.delete_process(&req.container_id, &req.exec_id))?;
        Ok(Empty::new())
    }

    fn state_container(&self, _: &TtrpcContext, req: ContainerRequest) -> R<StateContainerResponse> {
        log_err("StateContainer", self.containers.state(&req.container_id))
    }

    fn list_containers(&self, _: &TtrpcContext, _: Empty) -> R<ListContainersResponse> {
        let containers = self.containers.ids().iter().filter_map(|id| self.containers.state(id).ok()).collect();
        Ok(ListContainersResponse { containers, ..Default::default() })
    }

    fn list_pids(&self, _: &TtrpcContext, req: ContainerRequest) -> R<ListPidsResponse> {
        let pids = log_err("ListPids", self.containers.pids(&req.container_id))?;
        Ok(ListPidsResponse { pids, ..Default::default() })
    }

    fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> R<StatsResponse> {
        log_err("Stats", self.containers.stats(&req.container_id))
    }

    fn update_resources(&self, _: &TtrpcContext, req: UpdateResourcesRequest) -> R<Empty> {
        let r = hearth_oci::parse_resources(&req.resources_json).map_err(AgentError::from);
        let r = log_err("UpdateResources", r)?;
        log_err("UpdateResources", self.containers.update(&req.container_id, &r))?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> R<Empty> {
        log_err("ResizePty", self.containers.resize_pty(&req.container_id, &req.exec_id, req.width, req.height))?;
        Ok(Empty::new())
    }

    fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> R<Empty> {
        log_err("CloseStdin", self.containers.close_stdin(&req.container_id, &req.exec_id))?;
        Ok(Empty::new())
    }

    fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> R<OomEvent> {
        loop {
            if let Some(container_id) = self.containers.oom.next(Duration::from_secs(3600)) {
                return Ok(OomEvent { container_id, ..Default::default() });
            }
        }
    }

    fn health(&self, _: &TtrpcContext, _: Empty) -> R<HealthResponse> {
        Ok(system::health(self.mode.name()))
    }

    fn listening_ports(&self, _: &TtrpcContext, _: Empty) -> R<ListeningPortsResponse> {
        Ok(ListeningPortsResponse { tcp: crate::forward::listening_ports(), ..Default::default() })
    }

    fn sync_time(&self, _: &TtrpcContext, req: SyncTimeRequest) -> R<Empty> {
        log_err("SyncTime", system::set_time(req.unix_nanos))?;
        Ok(Empty::new())
    }

    fn mount(&self, _: &TtrpcContext, req: MountRequest) -> R<Empty> {
        log_err("Mount", system::mount_request(&req))?;
        Ok(Empty::new())
    }

    fn shutdown(&self, _: &TtrpcContext, _: Empty) -> R<Empty> {
        tracing::info!("shutdown requested: stopping every container");
        self.containers.stop_all(Duration::from_secs(5));
        let then = self.on_shutdown.clone();
        // Answer first; the caller is waiting for the reply.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            then();
        });
        Ok(Empty::new())
    }
}
