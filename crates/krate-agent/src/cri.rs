//! The CRI v1 client: gRPC over the runtime's unix socket, plus containerd's own event
//! stream (task exits and OOMs), which containerd 1.6 offers where its CRI
//! `GetContainerEvents` does not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1 as api;

/// A connection to a CRI runtime. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    channel: Channel,
    /// Where the runtime listens (containerd's own API shares it: image volumes).
    pub socket: PathBuf,
}

async fn channel(socket: &Path) -> Result<Channel> {
    let path: PathBuf = socket.to_path_buf();
    Ok(Endpoint::try_from("http://localhost")?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await?)
}

/// Whether process `pid` holds file `path` open.
pub fn holds_open(pid: i32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

impl Cri {
    /// Connects and asks the runtime its version (so a socket nobody serves fails here).
    pub async fn connect(socket: &Path) -> Result<(Cri, api::VersionResponse)> {
        let channel = channel(socket)
            .await
            .with_context(|| format!("connecting to the container runtime at {}", socket.display()))?;
        let mut cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel.clone()),
            channel,
            socket: socket.to_path_buf(),
        };
        let version = cri
            .runtime
            .version(api::VersionRequest { version: "v1".into() })
            .await
            .context("asking the container runtime its CRI version")?
            .into_inner();
        Ok((cri, version))
    }

    /// The process serving the runtime's socket (SO_PEERCRED of a connection to it).
    pub fn runtime_pid(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        let stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid)
    }

    /// The sandboxes carrying all of `labels`.
    pub async fn sandboxes_labelled(&mut self, labels: &[(&str, &str)]) -> Result<Vec<api::PodSandbox>, tonic::Status> {
        let filter = api::PodSandboxFilter { label_selector: selector(labels), ..Default::default() };
        Ok(self.runtime.list_pod_sandbox(api::ListPodSandboxRequest { filter: Some(filter) }).await?.into_inner().items)
    }

    /// The containers carrying all of `labels`, latest attempt first.
    pub async fn containers_labelled(&mut self, labels: &[(&str, &str)]) -> Result<Vec<api::Container>, tonic::Status> {
        self.containers(api::ContainerFilter { label_selector: selector(labels), ..Default::default() }).await
    }

    /// The containers `filter` selects, latest attempt first.
    pub async fn containers(&mut self, filter: api::ContainerFilter) -> Result<Vec<api::Container>, tonic::Status> {
        let mut list = self
            .runtime
            .list_containers(api::ListContainersRequest { filter: Some(filter) })
            .await?
            .into_inner()
            .containers;
        list.sort_by_key(|c| std::cmp::Reverse(c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0)));
        Ok(list)
    }

    /// Stops a sandbox (killing its containers) and removes it with them.
    pub async fn remove_sandbox(&mut self, id: &str) -> Result<(), tonic::Status> {
        // A sandbox that is already stopped (or half gone) is still removed.
        let _ = self.runtime.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: id.to_string() }).await;
        self.runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() })
            .await
            .map(|_| ())
    }

    /// containerd's event stream for `namespace`, filtered to task exits and OOMs.
    pub async fn task_events(&self, namespace: &str) -> Result<tonic::Streaming<events::Envelope>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.context("containerd's event service is not ready")?;
        let request = events::SubscribeRequest {
            filters: vec![
                format!("namespace=={namespace},topic==\"/tasks/exit\""),
                format!("namespace=={namespace},topic==\"/tasks/oom\""),
            ],
        };
        let path = http::uri::PathAndQuery::from_static("/containerd.services.events.v1.Events/Subscribe");
        let codec = tonic_prost::ProstCodec::<events::SubscribeRequest, events::Envelope>::default();
        Ok(grpc
            .server_streaming(tonic::Request::new(request), path, codec)
            .await
            .context("subscribing to containerd's events")?
            .into_inner())
    }
}

fn selector(labels: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The few messages of containerd's events API (`containerd/api/services/events/v1` and
/// `containerd/api/events/task.proto`) that the agent reads.
pub mod events {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeRequest {
        #[prost(string, repeated, tag = "1")]
        pub filters: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Envelope {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<prost_types::Timestamp>,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub topic: String,
        #[prost(message, optional, tag = "4")]
        pub event: Option<prost_types::Any>,
    }

    /// `/tasks/exit`: the process `id` of task `container_id` exited.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskExit {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, tag = "2")]
        pub id: String,
        #[prost(uint32, tag = "3")]
        pub pid: u32,
        #[prost(uint32, tag = "4")]
        pub exit_status: u32,
    }

    /// `/tasks/oom`: a task of `container_id` hit its memory limit.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TaskOom {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    impl Envelope {
        /// The container the event is about, for the topics the agent subscribes to.
        pub fn container_id(&self) -> Option<String> {
            use prost::Message;
            let any = self.event.as_ref()?;
            match self.topic.as_str() {
                "/tasks/exit" => TaskExit::decode(any.value.as_slice()).ok().map(|e| e.container_id),
                "/tasks/oom" => TaskOom::decode(any.value.as_slice()).ok().map(|e| e.container_id),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_held_open_by_the_process_that_opened_it_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let file = std::fs::File::create(&path).unwrap();
        let me = std::process::id() as i32;
        let path = std::fs::canonicalize(&path).unwrap();
        assert!(holds_open(me, &path));
        drop(file);
        assert!(!holds_open(me, &path));
    }
}
