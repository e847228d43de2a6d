//! Making an image in containerd from one root filesystem layer, and
//! unpacking it into a committed snapshot, as `ctr images import` does for
//! an archive: layer, config and manifest blobs (with the labels that keep
//! them and the snapshot from garbage collection), the image record, then
//! the layer applied by containerd's diff service.

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::snapshots::{CommitSnapshotRequest, StatSnapshotRequest};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, UpdateImageRequest,
};
use containerd_client::types::Descriptor;
use hearth_rootfs::tree::{Layer, LAYER_TAR_GZIP};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

use super::{call_err, is_already_exists, is_not_found, Containerd};

const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What was made.
#[derive(Debug, Clone)]
pub struct Imported {
    pub name: String,
    /// The committed snapshot holding the unpacked layer.
    pub chain_id: String,
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor { media_type: media_type.into(), digest: digest.into(), size: size as i64, ..Default::default() }
}

impl Containerd {
    /// Makes image `name` of `layer` (its default command `cmd`, labelled
    /// `labels`) and unpacks it for `snapshotter`.
    pub async fn import_layer(
        &self,
        name: &str,
        layer: &Layer,
        cmd: &[&str],
        labels: HashMap<String, String>,
        snapshotter: &str,
    ) -> Result<Imported> {
        let mut layer_labels = HashMap::new();
        if layer.media_type == LAYER_TAR_GZIP {
            layer_labels.insert("containerd.io/uncompressed".to_string(), layer.diff_id.clone());
        }
        let size_mib = layer.size >> 20;
        self.write_blob_file(
            &layer.digest,
            &layer.path,
            layer_labels,
            &format!("importing the root filesystem ({size_mib} MiB)"),
        )
        .await?;
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [PATH_ENV], "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        });
        let config = serde_json::to_vec(&config)?;
        let config_digest = sha256_digest(&config);
        // The config names the unpacked snapshot, so that it lives as long as the image.
        let snapshot_ref =
            HashMap::from([(format!("containerd.io/gc.ref.snapshot.{snapshotter}"), layer.diff_id.clone())]);
        self.write_blob(&config_digest, &config, snapshot_ref).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let manifest_digest = sha256_digest(&manifest);
        let children = HashMap::from([
            ("containerd.io/gc.ref.content.config".to_string(), config_digest.clone()),
            ("containerd.io/gc.ref.content.l.0".to_string(), layer.digest.clone()),
        ]);
        self.write_blob(&manifest_digest, &manifest, children).await?;
        let image = Image {
            name: name.into(),
            labels,
            target: Some(descriptor(MANIFEST, &manifest_digest, manifest.len() as u64)),
            ..Default::default()
        };
        match self
            .images()
            .create(self.req(CreateImageRequest { image: Some(image.clone()), ..Default::default() }))
            .await
        {
            Ok(_) => {}
            Err(e) if is_already_exists(&e) => {
                self.images()
                    .update(self.req(UpdateImageRequest { image: Some(image), ..Default::default() }))
                    .await
                    .map_err(call_err("updating the image"))?;
            }
            Err(e) => return Err(call_err("creating the image")(e)),
        }
        self.unpack(layer, snapshotter).await?;
        Ok(Imported { name: name.into(), chain_id: layer.diff_id.clone() })
    }

    /// Applies the layer into a committed snapshot named by its chain id,
    /// unless one is there already.
    async fn unpack(&self, layer: &Layer, snapshotter: &str) -> Result<()> {
        let chain = &layer.diff_id;
        let stat = self
            .snapshots()
            .stat(self.req(StatSnapshotRequest { snapshotter: snapshotter.into(), key: chain.clone() }))
            .await;
        match stat {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(call_err("looking up a snapshot")(e)),
        }
        let key = format!("hearth-extract-{}-{}", super::lease::unique(), chain.trim_start_matches("sha256:"));
        let mounts = self.prepare_snapshot(snapshotter, &key, "", HashMap::new()).await?;
        let progress = hearth_rootfs::progress::Progress::new(&format!(
            "unpacking the root filesystem ({} MiB)",
            layer.size >> 20
        ));
        let applied = self
            .diff()
            .apply(self.req(ApplyRequest {
                diff: Some(descriptor(&layer.media_type, &layer.digest, layer.size)),
                mounts,
                ..Default::default()
            }))
            .await;
        let result = async {
            let applied = applied.map_err(call_err("unpacking the layer"))?.into_inner().applied;
            let got = applied.map(|d| d.digest).unwrap_or_default();
            if &got != chain {
                bail!("the unpacked layer's digest {got} is not the diff id {chain} the image names");
            }
            self.snapshots()
                .commit(self.req(CommitSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    name: chain.clone(),
                    key: key.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(call_err("committing the unpacked snapshot"))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self.remove_snapshot(snapshotter, &key).await;
        }
        progress.finish(if result.is_ok() { "done" } else { "failed" });
        result
    }

    pub async fn image_exists(&self, name: &str) -> Result<bool> {
        match self.images().get(self.req(GetImageRequest { name: name.into() })).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(call_err("looking up an image")(e)),
        }
    }

    /// Deletes an image record; containerd then collects what only it used.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        match self
            .images()
            .delete(self.req(DeleteImageRequest { name: name.into(), sync: true, ..Default::default() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call_err("deleting an image")(e)).context(format!("image {name}")),
        }
    }
}
