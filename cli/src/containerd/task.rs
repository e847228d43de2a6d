//! Tasks: a container's running init and the processes exec'd beside it.

use anyhow::{Context, Result};
use containerd_client::services::v1::{
    CloseIoRequest, CreateTaskRequest, DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetRequest,
    KillRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use containerd_client::types::v1::Status;
use containerd_client::types::Mount;

use super::{call_err, is_not_found, Containerd, PROCESS_TYPE_URL};

/// Where a process's stdio goes, as containerd takes it: FIFO paths or
/// `file://` URIs on this host, empty for none.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A task's (or exec's) state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Created,
    Running,
    Stopped { exit_status: u32 },
    Paused,
    Unknown,
}

impl Containerd {
    /// The state of the init (`exec_id` empty) or an exec of container
    /// `id`'s task; None when it has no task.
    pub async fn task_state(&self, id: &str, exec_id: &str) -> Result<Option<(TaskState, u32)>> {
        let r = self.tasks().get(self.req(GetRequest { container_id: id.into(), exec_id: exec_id.into() })).await;
        let p = match r {
            Ok(r) => r.into_inner().process.context("containerd returned no process")?,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(call_err("getting a task")(e)),
        };
        let state = match Status::try_from(p.status).unwrap_or(Status::Unknown) {
            Status::Created => TaskState::Created,
            Status::Running => TaskState::Running,
            Status::Stopped => TaskState::Stopped { exit_status: p.exit_status },
            Status::Paused | Status::Pausing => TaskState::Paused,
            Status::Unknown => TaskState::Unknown,
        };
        Ok(Some((state, p.pid)))
    }

    /// Creates container `id`'s task on `rootfs`: the shim (hearth's, which
    /// boots the utility VM on first use) prepares its init.
    pub async fn create_task(&self, id: &str, rootfs: Vec<Mount>, stdio: &Stdio) -> Result<u32> {
        let r = self
            .tasks()
            .create(self.req(CreateTaskRequest {
                container_id: id.into(),
                rootfs,
                stdin: stdio.stdin.clone(),
                stdout: stdio.stdout.clone(),
                stderr: stdio.stderr.clone(),
                terminal: stdio.terminal,
                ..Default::default()
            }))
            .await
            .map_err(call_err("creating the task"))?;
        Ok(r.into_inner().pid)
    }

    /// Starts the init (`exec_id` empty) or an exec.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let r = self
            .tasks()
            .start(self.req(StartRequest { container_id: id.into(), exec_id: exec_id.into() }))
            .await
            .map_err(call_err("starting the process"))?;
        Ok(r.into_inner().pid)
    }

    /// Adds process `exec_id` (an OCI process as JSON) to container `id`'s
    /// task; it runs once started.
    pub async fn exec(&self, id: &str, exec_id: &str, process_json: Vec<u8>, stdio: &Stdio) -> Result<()> {
        let spec = prost_types::Any { type_url: PROCESS_TYPE_URL.into(), value: process_json };
        self.tasks()
            .exec(self.req(ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                stdin: stdio.stdin.clone(),
                stdout: stdio.stdout.clone(),
                stderr: stdio.stderr.clone(),
                terminal: stdio.terminal,
                spec: Some(spec),
            }))
            .await
            .map_err(call_err("adding the process"))?;
        Ok(())
    }

    /// Signals the init, an exec, or (`all`) every process of the task.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        match self
            .tasks()
            .kill(self.req(KillRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                signal: signal as u32,
                all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: nothing left to signal.
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call_err("signalling the process")(e)),
        }
    }

    /// Blocks until the process has exited; its exit status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<u32> {
        let r = self
            .tasks()
            .wait(self.req(WaitRequest { container_id: id.into(), exec_id: exec_id.into() }))
            .await
            .map_err(call_err("waiting for the process"))?;
        Ok(r.into_inner().exit_status)
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.tasks()
            .resize_pty(self.req(ResizePtyRequest { container_id: id.into(), exec_id: exec_id.into(), width, height }))
            .await
            .map_err(call_err("resizing the terminal"))?;
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.tasks()
            .close_io(self.req(CloseIoRequest { container_id: id.into(), exec_id: exec_id.into(), stdin: true }))
            .await
            .map_err(call_err("closing the process's input"))?;
        Ok(())
    }

    /// Forgets an exited exec.
    pub async fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        match self
            .tasks()
            .delete_process(self.req(DeleteProcessRequest { container_id: id.into(), exec_id: exec_id.into() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call_err("deleting the process")(e)),
        }
    }

    /// Deletes container `id`'s (stopped) task; its exit status.
    pub async fn delete_task(&self, id: &str) -> Result<Option<u32>> {
        match self.tasks().delete(self.req(DeleteTaskRequest { container_id: id.into() })).await {
            Ok(r) => Ok(Some(r.into_inner().exit_status)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(call_err("deleting the task")(e)),
        }
    }
}
