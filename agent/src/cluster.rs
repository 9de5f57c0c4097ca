//! Where the agent learns the cluster: a [`ClusterSource`] hands it a [`Cluster`] snapshot at
//! start and a new one whenever it changes. The first source is a static file, reloaded when it
//! changes; the Kubernetes Node source ([`crate::kubernetes::KubeSource`]) follows the API.

use std::{future::Future, path::PathBuf, time::Duration};

use podwire_core::cluster::{Cluster, InvalidCluster};
use tracing::warn;

/// Errors of reading the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid cluster description.
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        source: InvalidCluster,
    },
    /// Listing or watching Nodes failed; the watch lists again after a backoff.
    #[error("watching Nodes")]
    Watch(#[source] kube::runtime::watcher::Error),
    /// The Node watch ended, which it never should.
    #[error("the Node watch ended")]
    WatchEnded,
}

/// Where the cluster comes from.
pub trait ClusterSource: Send + 'static {
    /// The current cluster on the first call, then the next different one when it changes.
    fn next(&mut self) -> impl Future<Output = Result<Cluster, ClusterError>> + Send;
}

/// A JSON file, re-read when its content changes (polled: a ConfigMap volume swaps a symlink,
/// which inotify on the file does not see).
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    last: Option<Cluster>,
}

impl FileSource {
    pub fn new(path: PathBuf, interval: Duration) -> FileSource {
        FileSource {
            path,
            interval,
            last: None,
        }
    }

    fn read(&self) -> Result<Cluster, ClusterError> {
        let bytes = std::fs::read(&self.path).map_err(|source| ClusterError::Read {
            path: self.path.clone(),
            source,
        })?;
        Cluster::parse(&bytes).map_err(|source| ClusterError::Invalid {
            path: self.path.clone(),
            source,
        })
    }
}

impl ClusterSource for FileSource {
    async fn next(&mut self) -> Result<Cluster, ClusterError> {
        if self.last.is_none() {
            let cluster = self.read()?;
            self.last = Some(cluster.clone());
            return Ok(cluster);
        }
        loop {
            tokio::time::sleep(self.interval).await;
            match self.read() {
                Ok(cluster) if Some(&cluster) != self.last.as_ref() => {
                    self.last = Some(cluster.clone());
                    return Ok(cluster);
                }
                Ok(_) => {}
                // Keep the last good cluster while the file is being rewritten or is broken.
                Err(e) => warn!(
                    "{}; keeping the previous cluster",
                    podwire_core::error_chain(&e)
                ),
            }
        }
    }
}
