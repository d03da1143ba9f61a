//! Objects every namespace has: the `default` ServiceAccount and the `kube-root-ca.crt`
//! ConfigMap (the cluster CA, for clients inside pods). One controller shape for both:
//! watch namespaces and the objects of that name; create what is missing, put back what
//! was changed or deleted, leave terminating namespaces alone.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::{resource, tolerate, Error};

const ROOT_CA_DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

/// One object kept in every namespace.
#[derive(Clone)]
pub struct PerNamespace {
    pub resource: ApiResource,
    pub name: &'static str,
    /// Fields the object must have besides its metadata (`None`: any content will do).
    pub content: Option<Value>,
    pub annotations: &'static [(&'static str, &'static str)],
}

impl PerNamespace {
    pub fn default_service_account() -> Self {
        Self {
            resource: resource("", "v1", "ServiceAccount", "serviceaccounts"),
            name: "default",
            content: None,
            annotations: &[],
        }
    }

    pub fn root_ca(ca_pem: &str) -> Self {
        Self {
            resource: resource("", "v1", "ConfigMap", "configmaps"),
            name: "kube-root-ca.crt",
            content: Some(json!({"data": {"ca.crt": ca_pem}})),
            annotations: &[("kubernetes.io/description", ROOT_CA_DESCRIPTION)],
        }
    }

    fn desired(&self, ns: &str) -> Result<DynamicObject, Error> {
        let mut object = json!({
            "apiVersion": self.resource.api_version, "kind": self.resource.kind,
            "metadata": {"name": self.name, "namespace": ns},
        });
        for (key, value) in self.annotations {
            object["metadata"]["annotations"][key] = json!(value);
        }
        if let (Some(content), Some(obj)) = (&self.content, object.as_object_mut()) {
            obj.extend(content.as_object().cloned().unwrap_or_default());
        }
        Ok(serde_json::from_value(object)?)
    }
}

struct Context {
    client: kube::Client,
    kept: PerNamespace,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let phase = ns.status.as_ref().and_then(|s| s.phase.as_deref());
    if ns.metadata.deletion_timestamp.is_some() || phase == Some("Terminating") {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &name, &ctx.kept.resource);
    let desired = ctx.kept.desired(&name)?;
    match api.get_opt(ctx.kept.name).await? {
        // 403: the namespace started terminating meanwhile.
        None => tolerate(api.create(&PostParams::default(), &desired).await, &[403, 409])?,
        Some(mut current) => {
            let Some(content) = &ctx.kept.content else { return Ok(Action::await_change()) };
            let differs = content.as_object().into_iter().flatten().any(|(k, v)| current.data.get(k) != Some(v));
            if differs {
                if let Some(obj) = current.data.as_object_mut() {
                    obj.extend(content.as_object().cloned().unwrap_or_default());
                }
                api.replace(ctx.kept.name, &PostParams::default(), &current).await?;
            }
        }
    }
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(namespace = %ns.name_any(), object = ctx.kept.name, error = %err, "keeping a per-namespace object failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

pub async fn run(client: kube::Client, kept: PerNamespace) -> anyhow::Result<()> {
    let objects: Api<DynamicObject> = Api::all_with(client.clone(), &kept.resource);
    let by_name = watcher::Config::default().fields(&format!("metadata.name={}", kept.name));
    Controller::new(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .watches_with(objects, kept.resource.clone(), by_name, |obj| obj.namespace().map(|ns| ObjectRef::new(&ns)))
        .run(reconcile, error_policy, Arc::new(Context { client, kept }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}
