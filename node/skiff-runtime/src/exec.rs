//! Processes run inside a running container (`kubectl exec`): containerd's `Tasks.Exec` with
//! the container's own process spec (environment, working directory, user) and the requested
//! command, its standard streams connected through FIFOs that the runc shim opens, an optional
//! terminal (the shim allocates the pty; `resize` sets its size), and the exit status.
//!
//! FIFO handling follows containerd's own client (`cio`): this side holds the read end of
//! stdout/stderr before the shim opens the write end, so no output is lost and end of file
//! means the process and everything holding its output are gone; stdin is held read-write so
//! opening never blocks, and closing it is completed with `CloseIO`, which drops the shim's own
//! writer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_client::{
    services::v1::{
        CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, GetContainerRequest,
        ResizePtyRequest, StartRequest, containers_client::ContainersClient,
        tasks_client::TasksClient,
    },
    tonic::{Code, Request, transport::Channel},
    with_namespace,
};
use serde_json::{Value, json};
use tokio::net::unix::pipe;

use crate::containerd::NAMESPACE;

/// What to run in a container.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// The container (its task must be running).
    pub container_id: String,
    /// Command and arguments; looked up in the container's `PATH` like any exec.
    pub args: Vec<String>,
    /// Allocate a terminal (stdout carries both streams then).
    pub tty: bool,
    /// Connect stdin.
    pub stdin: bool,
    /// Connect stdout.
    pub stdout: bool,
    /// Connect stderr (ignored with a terminal).
    pub stderr: bool,
    /// The terminal's initial size (columns, rows), so the process sees the right size from
    /// its first instruction rather than after a later resize.
    pub console_size: Option<(u32, u32)>,
    /// A directory for this exec's FIFOs; created here, removed by [`Exec::cleanup`].
    pub fifo_dir: PathBuf,
}

/// A started exec process and the streams connected to it.
#[derive(Debug)]
pub struct Exec {
    control: ExecControl,
    fifo_dir: PathBuf,
    /// Writes to the process's stdin (when asked for).
    pub stdin: Option<pipe::Sender>,
    /// Reads the process's stdout (or its terminal).
    pub stdout: Option<pipe::Receiver>,
    /// Reads the process's stderr (not with a terminal).
    pub stderr: Option<pipe::Receiver>,
}

/// Why an exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The container or its task is not there (or not running).
    #[error("container not found ({0:?})")]
    NotFound(String),
    /// Anything else, with containerd's message (e.g. an executable that is not in `PATH`).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

fn fifo(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .with_context(|| format!("create the FIFO {}", p.display()))?;
    Ok(p)
}

/// The process spec of `args` in the container whose runtime spec is `spec`: the container's
/// user, environment, working directory and capabilities, as containerd's CRI exec does.
pub fn process_spec(spec: &Value, cfg: &ExecConfig) -> Result<Value> {
    let (args, tty) = (&cfg.args, cfg.tty);
    let mut p = spec
        .get("process")
        .cloned()
        .context("the container's runtime spec has no process")?;
    p["args"] = json!(args);
    p["terminal"] = json!(tty);
    if tty {
        let env = p["env"].as_array_mut();
        match env {
            Some(env)
                if env
                    .iter()
                    .any(|e| e.as_str().is_some_and(|e| e.starts_with("TERM="))) => {}
            Some(env) => env.push(json!("TERM=xterm")),
            None => p["env"] = json!(["TERM=xterm"]),
        }
    }
    match (tty, cfg.console_size) {
        (true, Some((width, height))) => {
            p["consoleSize"] = json!({"width": width, "height": height});
        }
        _ => {
            if let Some(o) = p.as_object_mut() {
                o.remove("consoleSize");
            }
        }
    }
    Ok(p)
}

impl Exec {
    /// Starts `cfg.args` in the container. The streams are connected before the process runs.
    pub async fn start(ch: &Channel, cfg: &ExecConfig) -> Result<Exec, ExecError> {
        if cfg.args.is_empty() {
            return Err(anyhow::anyhow!("no command to run").into());
        }
        let container = match ContainersClient::new(ch.clone())
            .get(with_namespace!(
                GetContainerRequest {
                    id: cfg.container_id.clone()
                },
                NAMESPACE
            ))
            .await
        {
            Ok(r) => r
                .into_inner()
                .container
                .context("containerd returned no container")?,
            Err(e) if e.code() == Code::NotFound => {
                return Err(ExecError::NotFound(cfg.container_id.clone()));
            }
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("read container {}", cfg.container_id))
                    .into());
            }
        };
        let spec: Value = container
            .spec
            .as_ref()
            .map(|s| serde_json::from_slice(&s.value))
            .transpose()
            .context("the container's runtime spec")?
            .context("the container has no runtime spec")?;
        let process = process_spec(&spec, cfg)?;
        let exec_id = cfg
            .fifo_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the FIFO directory has no name")?;
        std::fs::create_dir_all(&cfg.fifo_dir)
            .with_context(|| format!("create {}", cfg.fifo_dir.display()))?;
        let mut exec = Exec {
            control: ExecControl {
                ch: ch.clone(),
                container_id: cfg.container_id.clone(),
                exec_id,
            },
            fifo_dir: cfg.fifo_dir.clone(),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        match exec.launch(cfg, process).await {
            Ok(()) => Ok(exec),
            Err(e) => {
                exec.cleanup().await;
                Err(e)
            }
        }
    }

    async fn launch(&mut self, cfg: &ExecConfig, process: Value) -> Result<(), ExecError> {
        let dir = &cfg.fifo_dir;
        let mut paths = (String::new(), String::new(), String::new());
        // Writers held until the shim has opened its own, so that a read before then does not
        // see end of file.
        let mut placeholders = Vec::new();
        if cfg.stdin {
            let p = fifo(dir, "stdin")?;
            self.stdin = Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&p)
                    .context("open the stdin FIFO")?,
            );
            paths.0 = p.display().to_string();
        }
        let mut reader = |name: &str| -> Result<(pipe::Receiver, String)> {
            let p = fifo(dir, name)?;
            let r = pipe::OpenOptions::new()
                .open_receiver(&p)
                .with_context(|| format!("open the {name} FIFO"))?;
            placeholders.push(
                pipe::OpenOptions::new()
                    .open_sender(&p)
                    .with_context(|| format!("open the {name} FIFO"))?,
            );
            Ok((r, p.display().to_string()))
        };
        if cfg.stdout || cfg.tty {
            let (r, p) = reader("stdout")?;
            self.stdout = Some(r);
            paths.1 = p;
        }
        if cfg.stderr && !cfg.tty {
            let (r, p) = reader("stderr")?;
            self.stderr = Some(r);
            paths.2 = p;
        }
        let c = &self.control;
        let mut tasks = TasksClient::new(c.ch.clone());
        let not_found = |e: &containerd_client::tonic::Status| e.code() == Code::NotFound;
        tasks
            .exec(with_namespace!(
                ExecProcessRequest {
                    container_id: c.container_id.clone(),
                    stdin: paths.0,
                    stdout: paths.1,
                    stderr: paths.2,
                    terminal: cfg.tty,
                    spec: Some(prost_types::Any {
                        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process"
                            .into(),
                        value: serde_json::to_vec(&process).context("encode the process spec")?,
                    }),
                    exec_id: c.exec_id.clone(),
                },
                NAMESPACE
            ))
            .await
            .map_err(|e| {
                if not_found(&e) {
                    ExecError::NotFound(c.container_id.clone())
                } else {
                    anyhow::anyhow!("{}", e.message()).into()
                }
            })?;
        tasks
            .start(with_namespace!(
                StartRequest {
                    container_id: c.container_id.clone(),
                    exec_id: c.exec_id.clone(),
                },
                NAMESPACE
            ))
            .await
            .map_err(|e| ExecError::Failed(anyhow::anyhow!("{}", e.message())))?;
        drop(placeholders);
        Ok(())
    }

    /// Resizes, closes input, waits: usable while the streams are used elsewhere.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Removes the process from containerd (killing it if it still runs) and its FIFOs.
    pub async fn cleanup(&mut self) {
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        self.control.remove().await;
        let _ = std::fs::remove_dir_all(&self.fifo_dir);
    }
}

/// The containerd side of an exec: resize, close input, wait, remove.
#[derive(Clone, Debug)]
pub struct ExecControl {
    ch: Channel,
    container_id: String,
    exec_id: String,
}

impl ExecControl {
    /// Sets the terminal's size (columns × rows).
    pub async fn resize(&self, width: u32, height: u32) -> Result<()> {
        TasksClient::new(self.ch.clone())
            .resize_pty(with_namespace!(
                ResizePtyRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                    width,
                    height,
                },
                NAMESPACE
            ))
            .await
            .context("resize the terminal")?;
        Ok(())
    }

    /// Ends the process's input once the caller has dropped its writer ([`Exec::stdin`]): the
    /// shim drops its own, and the process reads end of file.
    pub async fn close_stdin(&self) -> Result<()> {
        TasksClient::new(self.ch.clone())
            .close_io(with_namespace!(
                CloseIoRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                    stdin: true,
                },
                NAMESPACE
            ))
            .await
            .context("close the process's stdin")?;
        Ok(())
    }

    /// Waits for the process to exit; returns its exit status (128 + signal when killed).
    pub async fn wait(&self) -> Result<u32> {
        crate::container::wait_process(&self.ch, &self.container_id, &self.exec_id).await
    }

    /// Removes the process from containerd, killing it first if it still runs.
    pub async fn remove(&self) {
        // containerd will not delete a running process: end it first (an exited one's wait
        // returns at once).
        let _ =
            crate::container::signal_process(&self.ch, &self.container_id, &self.exec_id, 9).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.wait()).await;
        if let Err(e) = TasksClient::new(self.ch.clone())
            .delete_process(with_namespace!(
                DeleteProcessRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                },
                NAMESPACE
            ))
            .await
            && e.code() != Code::NotFound
        {
            tracing::warn!(exec = %self.exec_id, container = %self.container_id, error = %e.message(), "removing an exec process failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_inherits_the_container_process() {
        let spec = json!({"process": {"args": ["sleep", "1"], "env": ["PATH=/bin", "A=1"],
            "cwd": "/srv", "user": {"uid": 0, "gid": 0}, "consoleSize": {"height": 1, "width": 1}}});
        let mut cfg = ExecConfig {
            container_id: "c".into(),
            args: vec!["ls".into(), "-l".into()],
            tty: false,
            stdin: false,
            stdout: true,
            stderr: true,
            console_size: Some((80, 24)),
            fifo_dir: PathBuf::from("/nonexistent"),
        };
        let p = process_spec(&spec, &cfg).unwrap();
        assert_eq!(p["args"], json!(["ls", "-l"]));
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["env"], json!(["PATH=/bin", "A=1"]));
        assert_eq!(p["terminal"], false);
        assert!(p.get("consoleSize").is_none());
        cfg.tty = true;
        let t = process_spec(&spec, &cfg).unwrap();
        assert_eq!(t["env"], json!(["PATH=/bin", "A=1", "TERM=xterm"]));
        assert_eq!(t["terminal"], true);
        assert_eq!(t["consoleSize"], json!({"width": 80, "height": 24}));
        assert!(process_spec(&json!({}), &cfg).is_err());
    }
}
