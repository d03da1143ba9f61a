//! A container's environment as upstream builds it: `envFrom` (ConfigMaps and Secrets,
//! with prefixes), then `env` in order (values with `$(VAR)` references to earlier
//! variables, fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;

use super::spec::expand;

/// Values the pod knows only once it runs.
pub struct Runtime<'a> {
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
}

async fn config_map(client: &kube::Client, ns: &str, name: &str, optional: bool) -> Result<BTreeMap<String, String>> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(cm) => Ok(cm.data.unwrap_or_default()),
        None if optional => Ok(BTreeMap::new()),
        None => Err(anyhow!("configmap \"{name}\" not found")),
    }
}

async fn secret(client: &kube::Client, ns: &str, name: &str, optional: bool) -> Result<BTreeMap<String, String>> {
    match Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(s) => {
            let mut out: BTreeMap<String, String> = s.string_data.unwrap_or_default();
            for (k, v) in s.data.unwrap_or_default() {
                out.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            Ok(out)
        }
        None if optional => Ok(BTreeMap::new()),
        None => Err(anyhow!("secret \"{name}\" not found")),
    }
}

/// The value of a `fieldRef` path.
pub fn field(pod: &Pod, path: &str, rt: &Runtime) -> Result<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels", &meta.labels).or_else(|| keyed("metadata.annotations", &meta.annotations)) {
        return Ok(v);
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => rt.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => rt.host_ip.to_string(),
        other => return Err(anyhow!("unsupported fieldRef path {other:?}")),
    })
}

/// The value of a `resourceFieldRef` (limits default to the node's allocatable, which
/// the agent does not pass here: an unset limit reads as 0).
fn resource_field(container: &Container, resource: &str, divisor: Option<&str>) -> Result<String> {
    let (which, name) = resource.split_once('.').ok_or_else(|| anyhow!("unsupported resourceFieldRef {resource:?}"))?;
    let res = container.resources.as_ref();
    let map = match which {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(anyhow!("unsupported resourceFieldRef {resource:?}")),
    };
    let value = map.and_then(|m| m.get(name)).and_then(|q| krate_api::quantity::parse(&q.0)).unwrap_or(0.0);
    let divisor = divisor.and_then(krate_api::quantity::parse).filter(|d| *d > 0.0).unwrap_or(1.0);
    Ok(((value / divisor).ceil() as i64).to_string())
}

/// The container's environment, in order, with later definitions replacing earlier ones.
pub async fn resolve(client: &kube::Client, pod: &Pod, container: &Container, rt: &Runtime<'_>) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            config_map(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &from.secret_ref {
            secret(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            set(&mut vars, format!("{prefix}{k}"), v);
        }
    }
    for e in container.env.iter().flatten() {
        let value = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or_default(), &vars),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    field(pod, &f.field_path, rt)?
                } else if let Some(r) = &from.resource_field_ref {
                    resource_field(container, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match config_map(client, ns, &r.name, optional).await?.remove(&r.key) {
                        Some(v) => v,
                        None if optional => continue,
                        None => return Err(anyhow!("couldn't find key {} in ConfigMap {ns}/{}", r.key, r.name)),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match secret(client, ns, &r.name, optional).await.context("reading a secretKeyRef")?.remove(&r.key) {
                        Some(v) => v,
                        None if optional => continue,
                        None => return Err(anyhow!("couldn't find key {} in Secret {ns}/{}", r.key, r.name)),
                    }
                } else {
                    String::new()
                }
            }
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(order.into_iter().map(|k| {
        let v = vars[&k].clone();
        (k, v)
    }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_paths() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"}}, "spec": {"nodeName": "n1", "containers": []}})).unwrap();
        let rt = Runtime { pod_ip: "10.42.0.5", host_ip: "127.0.0.1" };
        assert_eq!(field(&pod, "metadata.labels['app']", &rt).unwrap(), "web");
        assert_eq!(field(&pod, "metadata.annotations['x']", &rt).unwrap(), "");
        assert_eq!(field(&pod, "spec.nodeName", &rt).unwrap(), "n1");
        assert_eq!(field(&pod, "status.podIP", &rt).unwrap(), "10.42.0.5");
        assert!(field(&pod, "spec.bogus", &rt).is_err());
    }

    #[test]
    fn resource_fields_round_up_by_divisor() {
        let c: Container = serde_json::from_value(json!({"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}})).unwrap();
        assert_eq!(resource_field(&c, "limits.cpu", None).unwrap(), "1");
        assert_eq!(resource_field(&c, "limits.cpu", Some("1m")).unwrap(), "250");
        assert_eq!(resource_field(&c, "limits.memory", Some("1Mi")).unwrap(), "64");
    }
}
