//! containerd's content store: blobs addressed by digest (layers, image
//! configs, manifests), written through the streaming Write call.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::{InfoRequest, WriteAction, WriteContentRequest};
use tokio_stream::StreamExt;

use super::{call_err, is_not_found, Containerd};
use hearth_rootfs::progress::Progress;

/// Bytes per Write message: well under gRPC's default message limit.
const CHUNK: usize = 1 << 20;

impl Containerd {
    /// Whether the store has the blob `digest`.
    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        match self.content().info(self.req(InfoRequest { digest: digest.into() })).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(call_err("looking up a blob")(e)),
        }
    }

    /// Writes a blob from memory.
    pub async fn write_blob(&self, digest: &str, data: &[u8], labels: HashMap<String, String>) -> Result<()> {
        self.write_blob_from(digest, data.len() as u64, std::io::Cursor::new(data.to_vec()), labels, None).await
    }

    /// Writes the file at `path` as the blob `digest`, showing progress.
    pub async fn write_blob_file(
        &self,
        digest: &str,
        path: &Path,
        labels: HashMap<String, String>,
        what: &str,
    ) -> Result<()> {
        let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let progress = Progress::bytes(what, size);
        self.write_blob_from(digest, size, file, labels, Some(progress)).await
    }

    /// Streams `size` bytes from `reader` into the store, to be committed as
    /// `digest` with `labels`. containerd checks the digest and size; a blob
    /// it already has is left as it is (its labels are updated).
    async fn write_blob_from(
        &self,
        digest: &str,
        size: u64,
        mut reader: impl Read + Send + 'static,
        labels: HashMap<String, String>,
        mut progress: Option<Progress>,
    ) -> Result<()> {
        if self.has_blob(digest).await? {
            self.set_blob_labels(digest, labels).await?;
            if let Some(p) = progress {
                p.finish("already in containerd's content store");
            }
            return Ok(());
        }
        let reference = format!("hearth-{}-{}", std::process::id(), digest.trim_start_matches("sha256:"));
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        // The reading runs on a thread of its own; messages go out as they
        // are read, and containerd answers each.
        let expected = digest.to_string();
        let r = reference.clone();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let reader_thread = std::thread::spawn(move || -> Result<()> {
            let mut offset = 0u64;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = read_full(&mut reader, &mut buf)?;
                if n == 0 {
                    break;
                }
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r.clone(),
                    total: size as i64,
                    offset: offset as i64,
                    data: buf[..n].to_vec(),
                    ..Default::default()
                };
                offset += n as u64;
                if tx.blocking_send(msg).is_err() {
                    bail!("containerd ended the write early");
                }
                let _ = done_tx.send(n as u64);
            }
            if offset != size {
                bail!("read {offset} bytes where {size} were expected (did the file change?)");
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: r,
                total: size as i64,
                offset: offset as i64,
                expected,
                labels,
                ..Default::default()
            };
            let _ = tx.blocking_send(commit);
            Ok(())
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses =
            self.content().write(self.req(stream)).await.map_err(call_err("writing a blob"))?.into_inner();
        let mut committed = false;
        loop {
            tokio::select! {
                // Disabled once the reader is done (the channel closed).
                Some(n) = done_rx.recv() => {
                    if let Some(p) = progress.as_mut() {
                        p.advance(n);
                    }
                }
                r = responses.next() => match r {
                    Some(Ok(resp)) => {
                        if resp.action == WriteAction::Commit as i32 {
                            committed = true;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = reader_thread.join();
                        return Err(call_err("writing a blob")(e));
                    }
                    None => break,
                },
            }
        }
        reader_thread.join().map_err(|_| anyhow::anyhow!("the blob reader panicked"))??;
        if !committed {
            bail!("containerd did not commit blob {digest}");
        }
        if let Some(p) = progress {
            p.finish("written to containerd's content store");
        }
        Ok(())
    }

    /// Replaces a blob's labels (garbage-collection references, mostly).
    pub async fn set_blob_labels(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        use containerd_client::services::v1::{Info, UpdateRequest};
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = Info { digest: digest.into(), labels, ..Default::default() };
        self.content()
            .update(self.req(UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) }))
            .await
            .map_err(call_err("labelling a blob"))?;
        Ok(())
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}
