//! Services: cluster IPs from the service CIDRs and node ports from the node port range,
//! reserved as a Service is written and released when it goes (or is never stored), as
//! upstream's service REST storage does in its BeginCreate/BeginUpdate hooks.
//!
//! Each cluster IP is an IPAddress object (networking.k8s.io/v1) named by the address,
//! with a parentRef to its Service, as upstream's allocator keeps them: reserving is
//! creating it (a second Service asking for the same address gets AlreadyExists),
//! releasing is deleting it. Each node port is a key of its own under
//! `/registry/ranges/servicenodeports/` (upstream keeps one bitmap object; a key per port
//! needs no read-modify-write of a shared object). Both live in the store, so they survive
//! restarts; [`Allocator::repair`] reconciles them with the Services after a crash.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::IPAddress;
use krate_api::object::{self, get, get_str};
use krate_api::strategy::{needs_cluster_ip, needs_health_check_node_port, needs_node_ports};
use krate_api::{ApiError, ApiResult, FieldError};
use krate_net::Cidr;
use krate_store::StoreError;
use serde_json::{json, Value};

use super::Hooks;
use crate::registry::{DeleteOptions, Storage, WriteOptions};

/// Where node port reservations are kept.
pub const NODE_PORTS_PREFIX: &str = "/registry/ranges/servicenodeports/";
const MANAGED_BY_LABEL: &str = "ipaddress.kubernetes.io/managed-by";
const MANAGED_BY: &str = "ipallocator.k8s.io";
const FAMILY_LABEL: &str = "ipaddress.kubernetes.io/ip-family";
/// Addresses tried before a range counts as full (an IPv6 range may be vast).
const MAX_PROBES: u128 = 1 << 16;

/// The cluster's service addresses and node ports.
#[derive(Clone, Debug)]
pub struct ServiceNetwork {
    /// One or two ranges (dual-stack: one per family), the primary first.
    pub cidrs: Vec<Cidr>,
    pub node_ports: RangeInclusive<u16>,
    /// How old a reservation without its Service must be before repair releases it (a
    /// create may be between reserving and storing).
    pub leak_grace: Duration,
}

impl Default for ServiceNetwork {
    fn default() -> Self {
        Self {
            cidrs: vec!["10.43.0.0/16".parse().expect("a valid CIDR")],
            node_ports: 30000..=32767,
            leak_grace: Duration::from_secs(60),
        }
    }
}

impl ServiceNetwork {
    /// The `kubernetes` Service's address: the primary range's first.
    pub fn kubernetes_ip(&self) -> IpAddr {
        self.cidrs[0].gateway()
    }

    fn dual_stack(&self) -> bool {
        self.cidrs.len() > 1
    }

    fn cidr_of(&self, family: &str) -> Option<&Cidr> {
        self.cidrs.iter().find(|c| family_of(c.is_ipv4()) == family)
    }
}

fn family_of(ipv4: bool) -> &'static str {
    if ipv4 {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// The Service an allocation belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    namespace: String,
    name: String,
}

impl Owner {
    fn of(svc: &Value) -> Self {
        Owner { namespace: object::namespace(svc).unwrap_or_default().to_string(), name: object::name(svc).into() }
    }

    fn of_address(address: &Value) -> Option<Self> {
        let parent = get(address, &["spec", "parentRef"])?;
        (get_str(parent, &["resource"]) == Some("services")).then(|| Owner {
            namespace: get_str(parent, &["namespace"]).unwrap_or_default().to_string(),
            name: get_str(parent, &["name"]).unwrap_or_default().to_string(),
        })
    }

    fn of_port(record: &Value) -> Option<Self> {
        Some(Owner {
            namespace: get_str(record, &["service", "namespace"])?.to_string(),
            name: get_str(record, &["service", "name"])?.to_string(),
        })
    }
}

/// Why a reservation failed: upstream's allocator errors.
enum Refused {
    /// The caller's fault: rendered as a field error (422).
    Invalid(String),
    /// Nothing left (500), or the store failed.
    Internal(ApiError),
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Refused::Internal(e)
    }
}

/// The cluster IPs a Service holds (headless and ExternalName ones hold none).
fn held_ips(svc: &Value) -> Vec<IpAddr> {
    if !needs_cluster_ip(svc) {
        return vec![];
    }
    let ips = get(svc, &["spec", "clusterIPs"]).and_then(Value::as_array).cloned().unwrap_or_default();
    ips.iter().filter_map(|ip| ip.as_str()?.parse().ok()).collect()
}

/// The node ports a Service holds, the health check node port included.
fn held_ports(svc: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    if needs_node_ports(svc) {
        let listed = get(svc, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
        ports.extend(listed.iter().filter_map(|p| p.get("nodePort")?.as_u64()).filter_map(|p| u16::try_from(p).ok()));
    }
    if needs_health_check_node_port(svc) {
        ports.extend(
            get(svc, &["spec", "healthCheckNodePort"]).and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()),
        );
    }
    ports.retain(|p| *p != 0);
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What one write reserved, to give back if it does not happen.
#[derive(Default)]
struct Reserved {
    ips: Vec<IpAddr>,
    ports: Vec<u16>,
}

/// The allocator of a server's Services.
pub struct Allocator {
    net: ServiceNetwork,
}

impl Allocator {
    pub fn new(net: ServiceNetwork) -> Arc<Self> {
        Arc::new(Self { net })
    }

    fn address_object(ip: IpAddr, owner: &Owner) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IPAddress",
            "metadata": {"name": ip.to_string(), "labels": {FAMILY_LABEL: family_of(ip.is_ipv4()), MANAGED_BY_LABEL: MANAGED_BY}},
            "spec": {"parentRef": {"resource": "services", "namespace": owner.namespace, "name": owner.name}},
        })
    }

    fn taken_ip(storage: &Storage, ip: IpAddr) -> bool {
        storage.cached(&storage.builtin::<IPAddress>(None), &ip.to_string()).is_ok()
    }

    /// Creates the IPAddress for `ip`; false when someone holds it already.
    async fn claim_ip(storage: &Storage, ip: IpAddr, owner: &Owner) -> ApiResult<bool> {
        let scope = storage.builtin::<IPAddress>(None);
        let opts = WriteOptions { field_manager: MANAGED_BY.into(), ..Default::default() };
        match storage.create(&scope, Self::address_object(ip, owner), &opts).await {
            Ok(_) => Ok(true),
            Err(e) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reserves the address a Service asked for.
    async fn reserve_ip(&self, storage: &Storage, ip: IpAddr, owner: &Owner, dry_run: bool) -> Result<(), Refused> {
        let Some(cidr) = self.net.cidrs.iter().find(|c| c.contains(ip)) else {
            return Err(Refused::Invalid("the provided network does not match the current range".into()));
        };
        let offset = cidr.offset_of(ip).unwrap_or(0);
        let broadcast = cidr.is_ipv4() && offset == cidr.size() - 1;
        if offset == 0 || broadcast {
            return Err(Refused::Invalid(format!(
                "the provided IP ({ip}) is not in the valid range. The range of valid IPs is {cidr}"
            )));
        }
        let claimed = if dry_run { !Self::taken_ip(storage, ip) } else { Self::claim_ip(storage, ip, owner).await? };
        if !claimed {
            return Err(Refused::Invalid("provided IP is already allocated".into()));
        }
        Ok(())
    }

    /// Reserves a free address of `cidr`: first from the upper part of the range (from a
    /// random place), then from the lower part, which upstream leaves to addresses asked
    /// for by name (KEP-3070).
    async fn next_ip(&self, storage: &Storage, cidr: &Cidr, owner: &Owner, dry_run: bool) -> ApiResult<IpAddr> {
        if dry_run {
            // As upstream: a dry run shows the range's network address.
            return Ok(cidr.network);
        }
        let size = cidr.size();
        let last = if cidr.is_ipv4() { size.saturating_sub(2) } else { size.saturating_sub(1) };
        let split = (size / 16).clamp(16, 256).min(last + 1);
        let start = if last >= split { split + rand::random::<u64>() as u128 % (last - split + 1) } else { 1 };
        let upper = (start..=last).chain(split..start);
        let lower = 1..split;
        for offset in upper.chain(lower).take(MAX_PROBES as usize) {
            let Some(ip) = cidr.nth(offset) else { continue };
            if !Self::taken_ip(storage, ip) && Self::claim_ip(storage, ip, owner).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::internal("failed to allocate a serviceIP: range is full"))
    }

    async fn release_ip(storage: &Storage, ip: IpAddr, owner: &Owner) {
        let scope = storage.builtin::<IPAddress>(None);
        let Ok(found) = storage.get(&scope, &ip.to_string()).await else { return };
        if Owner::of_address(&found.parse()).as_ref() == Some(owner) {
            let _ = storage.delete(&scope, &ip.to_string(), &DeleteOptions::default()).await;
        }
    }

    fn port_key(port: u16) -> String {
        format!("{NODE_PORTS_PREFIX}{port}")
    }

    fn taken_port(storage: &Storage, port: u16) -> bool {
        let key = Self::port_key(port);
        storage.cache.resource(NODE_PORTS_PREFIX).state.read().expect("cache lock").objects.contains_key(&key)
    }

    async fn claim_port(storage: &Storage, port: u16, owner: &Owner) -> ApiResult<bool> {
        let record = json!({
            "metadata": {"name": port.to_string(), "creationTimestamp": object::now_rfc3339()},
            "service": {"namespace": owner.namespace, "name": owner.name},
        });
        let bytes = serde_json::to_vec(&record).map_err(|e| ApiError::internal(e.to_string()))?;
        match storage.store.create(&Self::port_key(port), bytes.into()).await {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    async fn reserve_port(&self, storage: &Storage, port: u16, owner: &Owner, dry_run: bool) -> Result<(), Refused> {
        let range = &self.net.node_ports;
        if !range.contains(&port) {
            return Err(Refused::Invalid(format!(
                "provided port is not in the valid range. The range of valid ports is {}-{}",
                range.start(),
                range.end()
            )));
        }
        let claimed =
            if dry_run { !Self::taken_port(storage, port) } else { Self::claim_port(storage, port, owner).await? };
        if !claimed {
            return Err(Refused::Invalid("provided port is already allocated".into()));
        }
        Ok(())
    }

    /// A free node port: the upper part of the range first, as upstream.
    async fn next_port(&self, storage: &Storage, owner: &Owner, dry_run: bool) -> ApiResult<u16> {
        let (base, end) = (*self.net.node_ports.start(), *self.net.node_ports.end());
        let size = u32::from(end - base) + 1;
        let split = base + (size / 32).clamp(16, 128).min(size - 1) as u16;
        let start = split + (rand::random::<u32>() % (u32::from(end - split) + 1)) as u16;
        for port in (start..=end).chain(split..start).chain(base..split) {
            if Self::taken_port(storage, port) {
                continue;
            }
            if dry_run || Self::claim_port(storage, port, owner).await? {
                return Ok(port);
            }
        }
        Err(ApiError::internal("failed to allocate a nodePort: range is full"))
    }

    async fn release_port(storage: &Storage, port: u16, owner: &Owner) {
        let key = Self::port_key(port);
        let Ok(Some(kv)) = storage.store.get(&key).await else { return };
        let record: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        if Owner::of_port(&record).as_ref() == Some(owner) {
            let _ = storage.store.delete(&key, Some(kv.mod_revision)).await;
        }
    }

    async fn release(storage: &Storage, owner: &Owner, ips: &[IpAddr], ports: &[u16]) {
        for ip in ips {
            Self::release_ip(storage, *ip, owner).await;
        }
        for port in ports {
            Self::release_port(storage, *port, owner).await;
        }
    }

    /// Fills in `ipFamilyPolicy` and `ipFamilies` (upstream's initIPFamilyFields).
    fn init_families(&self, svc: &mut Value) -> ApiResult<Vec<String>> {
        let name = object::name(svc).to_string();
        let invalid = |field: &str, value: Value, detail: &str| {
            ApiError::invalid("", "Service", &name, &[FieldError::invalid(field, &value, detail)])
        };
        let ips: Vec<String> = get(svc, &["spec", "clusterIPs"])
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let headless = ips == ["None"];
        let selectorless = get(svc, &["spec", "selector"]).and_then(Value::as_object).is_none_or(|m| m.is_empty());
        let primary = family_of(self.net.cidrs[0].is_ipv4());
        let policy = match get_str(svc, &["spec", "ipFamilyPolicy"]).filter(|p| !p.is_empty()) {
            Some(p) => p.to_string(),
            None if headless && selectorless => "RequireDualStack".to_string(),
            None => "SingleStack".to_string(),
        };
        const POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
        if !POLICIES.contains(&policy.as_str()) {
            return Err(ApiError::invalid(
                "",
                "Service",
                &name,
                &[FieldError::not_supported("spec.ipFamilyPolicy", &json!(policy), POLICIES)],
            ));
        }
        let mut families: Vec<String> = match get(svc, &["spec", "ipFamilies"]).and_then(Value::as_array) {
            Some(given) if !given.is_empty() => given.iter().filter_map(|f| f.as_str().map(str::to_string)).collect(),
            _ if !headless && !ips.is_empty() => {
                ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()).map(|ip| family_of(ip.is_ipv4()).into()).collect()
            }
            _ => vec![primary.to_string()],
        };
        // A headless Service without a selector lists both families, as upstream, on
        // any cluster: its endpoints are whatever is written to it.
        let lenient = headless && selectorless;
        if !lenient {
            if policy == "RequireDualStack" && !self.net.dual_stack() {
                return Err(invalid(
                    "spec.ipFamilyPolicy",
                    json!(policy),
                    "this cluster is not configured for dual-stack services",
                ));
            }
            for (i, family) in families.iter().enumerate() {
                if self.net.cidr_of(family).is_none() {
                    return Err(invalid(
                        &format!("spec.ipFamilies[{i}]"),
                        json!(family),
                        "not configured on this cluster",
                    ));
                }
            }
        }
        if families.len() == 1 && policy != "SingleStack" && (self.net.dual_stack() || lenient) {
            families.push(if families[0] == "IPv4" { "IPv6".into() } else { "IPv4".into() });
        }
        object::set(svc, &["spec", "ipFamilyPolicy"], json!(policy));
        object::set(svc, &["spec", "ipFamilies"], json!(families));
        Ok(families)
    }

    /// Reserves what `svc` needs beyond what `old` (the stored Service, for an update)
    /// already holds, writing the allocated values into it; `done` collects what was
    /// reserved, for the caller to give back if anything fails.
    async fn allocate(
        &self,
        storage: &Storage,
        old: Option<&Value>,
        svc: &mut Value,
        dry_run: bool,
        done: &mut Reserved,
    ) -> ApiResult<()> {
        let owner = Owner::of(svc);
        let name = owner.name.clone();
        let invalid = |field: String, value: Value, detail: String| {
            ApiError::invalid("", "Service", &name, &[FieldError::invalid(field, &value, &detail)])
        };
        let families = self.init_families(svc)?;
        let mut ips: Vec<String> = get(svc, &["spec", "clusterIPs"])
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if ips != ["None"] {
            let old_ips: Vec<IpAddr> = old.map(held_ips).unwrap_or_default();
            for (i, family) in families.iter().enumerate() {
                match ips.get(i).map(|ip| ip.parse::<IpAddr>()) {
                    Some(Ok(ip)) if old_ips.contains(&ip) => {}
                    Some(Ok(ip)) => match self.reserve_ip(storage, ip, &owner, dry_run).await {
                        Ok(()) => done.ips.push(ip),
                        Err(Refused::Invalid(why)) => {
                            return Err(invalid(
                                "spec.clusterIPs".into(),
                                json!(ips),
                                format!("failed to allocate IP {ip}: {why}"),
                            ))
                        }
                        Err(Refused::Internal(e)) => return Err(e),
                    },
                    // Validation refused malformed addresses already.
                    Some(Err(_)) => {}
                    None => {
                        let cidr = self.net.cidr_of(family).expect("families are configured ones");
                        let ip = self.next_ip(storage, cidr, &owner, dry_run).await?;
                        if !dry_run {
                            done.ips.push(ip);
                        }
                        ips.push(ip.to_string());
                    }
                }
            }
            if let Some(first) = ips.first() {
                object::set(svc, &["spec", "clusterIP"], json!(first));
                object::set(svc, &["spec", "clusterIPs"], json!(ips));
            }
        }
        let old_ports = old.map(held_ports).unwrap_or_default();
        if needs_node_ports(svc) {
            self.allocate_node_ports(storage, &owner, svc, &old_ports, dry_run, done).await?;
        }
        if needs_health_check_node_port(svc) {
            let requested = get(svc, &["spec", "healthCheckNodePort"]).and_then(Value::as_u64).unwrap_or(0) as u16;
            if requested == 0 {
                let port = self.next_port(storage, &owner, dry_run).await?;
                done.ports.push(port);
                object::set(svc, &["spec", "healthCheckNodePort"], json!(port));
            } else if !old_ports.contains(&requested) {
                match self.reserve_port(storage, requested, &owner, dry_run).await {
                    Ok(()) => done.ports.push(requested),
                    Err(Refused::Invalid(why)) => {
                        return Err(ApiError::internal(format!(
                            "failed to allocate requested HealthCheck NodePort {requested}: {why}"
                        )))
                    }
                    Err(Refused::Internal(e)) => return Err(e),
                }
            }
        }
        if dry_run {
            done.ips.clear();
            done.ports.clear();
        }
        Ok(())
    }

    /// Node ports for every port of the Service: the ones asked for, and new ones for the
    /// rest (ports sharing a port number, TCP and UDP 53, share a node port).
    async fn allocate_node_ports(
        &self,
        storage: &Storage,
        owner: &Owner,
        svc: &mut Value,
        old_ports: &[u16],
        dry_run: bool,
        done: &mut Reserved,
    ) -> ApiResult<()> {
        let mut ports = get(svc, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
        let mut claimed: Vec<u16> = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let Some(wanted) = p.get("nodePort").and_then(Value::as_u64).filter(|n| *n != 0) else { continue };
            let wanted = u16::try_from(wanted).unwrap_or(0);
            if old_ports.contains(&wanted) || claimed.contains(&wanted) {
                continue;
            }
            match self.reserve_port(storage, wanted, owner, dry_run).await {
                Ok(()) => {
                    claimed.push(wanted);
                    done.ports.push(wanted);
                }
                Err(Refused::Invalid(why)) => {
                    let field = format!("spec.ports[{i}].nodePort");
                    return Err(ApiError::invalid(
                        "",
                        "Service",
                        &owner.name,
                        &[FieldError::invalid(field, &json!(p["nodePort"]), &why)],
                    ));
                }
                Err(Refused::Internal(e)) => return Err(e),
            }
        }
        for i in 0..ports.len() {
            if ports[i].get("nodePort").and_then(Value::as_u64).unwrap_or(0) != 0 {
                continue;
            }
            let number = ports[i].get("port").cloned();
            let shared = ports
                .iter()
                .find(|p| {
                    p.get("port").cloned() == number && p.get("nodePort").and_then(Value::as_u64).unwrap_or(0) != 0
                })
                .and_then(|p| p["nodePort"].as_u64());
            let port = match shared {
                Some(port) => port as u16,
                None => {
                    let port = self.next_port(storage, owner, dry_run).await?;
                    done.ports.push(port);
                    port
                }
            };
            ports[i]["nodePort"] = json!(port);
        }
        object::set(svc, &["spec", "ports"], json!(ports));
        Ok(())
    }

    /// Makes the reservations agree with the Services: a Service's address or port that
    /// has no reservation gets one, and a reservation whose Service is gone (or no longer
    /// holds it) is released once older than the leak grace. Run at start and after.
    pub async fn repair(&self, storage: &Storage) -> ApiResult<Repaired> {
        storage.cache.sync().await;
        let mut repaired = Repaired::default();
        let services = storage.cached_objects(&storage.builtin::<Service>(None), false).await;
        let holders = |matches: &dyn Fn(&Value) -> bool| services.iter().find(|s| matches(s)).map(Owner::of);
        for svc in &services {
            let owner = Owner::of(svc);
            for ip in held_ips(svc) {
                if !Self::taken_ip(storage, ip) && self.net.cidrs.iter().any(|c| c.contains(ip)) {
                    tracing::warn!(%ip, service = %format!("{}/{}", owner.namespace, owner.name), "cluster IP was not allocated; repairing");
                    Self::claim_ip(storage, ip, &owner).await?;
                    repaired.claimed += 1;
                }
            }
            for port in held_ports(svc) {
                if !Self::taken_port(storage, port) && self.net.node_ports.contains(&port) {
                    tracing::warn!(port, service = %format!("{}/{}", owner.namespace, owner.name), "node port was not allocated; repairing");
                    Self::claim_port(storage, port, &owner).await?;
                    repaired.claimed += 1;
                }
            }
        }
        let old_enough = |obj: &Value| {
            get_str(obj, &["metadata", "creationTimestamp"]).and_then(|t| t.parse::<jiff::Timestamp>().ok()).is_none_or(
                |t| jiff::Timestamp::now().duration_since(t).as_secs() >= self.net.leak_grace.as_secs() as i64,
            )
        };
        let addresses = storage.cached_objects(&storage.builtin::<IPAddress>(None), false).await;
        for address in addresses
            .iter()
            .filter(|a| get_str(a, &["metadata", "labels", MANAGED_BY_LABEL]) == Some(MANAGED_BY) && old_enough(a))
        {
            let Ok(ip) = object::name(address).parse::<IpAddr>() else { continue };
            let holder = holders(&|s| held_ips(s).contains(&ip));
            if holder.is_none() || holder != Owner::of_address(address) {
                tracing::warn!(%ip, "cluster IP appears to have leaked; cleaning up");
                let scope = storage.builtin::<IPAddress>(None);
                let _ = storage.delete(&scope, object::name(address), &DeleteOptions::default()).await;
                repaired.released += 1;
            }
        }
        let records: Vec<Value> = {
            let rc = storage.cache.resource(NODE_PORTS_PREFIX);
            let state = rc.state.read().expect("cache lock");
            state.objects.values().map(|o| o.parse()).collect()
        };
        for record in records.iter().filter(|r| old_enough(r)) {
            let Ok(port) = object::name(record).parse::<u16>() else { continue };
            let holder = holders(&|s| held_ports(s).contains(&port));
            if holder.is_none() || holder != Owner::of_port(record) {
                tracing::warn!(port, "node port appears to have leaked; cleaning up");
                let key = Self::port_key(port);
                if let Ok(Some(kv)) = storage.store.get(&key).await {
                    let _ = storage.store.delete(&key, Some(kv.mod_revision)).await;
                }
                repaired.released += 1;
            }
        }
        Ok(repaired)
    }
}

/// What a repair pass changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    pub claimed: usize,
    pub released: usize,
}

#[async_trait::async_trait]
impl Hooks for Allocator {
    async fn begin_create(&self, storage: &Storage, obj: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        if !needs_cluster_ip(obj) {
            return Ok(());
        }
        let mut done = Reserved::default();
        let result = self.allocate(storage, None, obj, opts.dry_run, &mut done).await;
        if result.is_err() {
            Self::release(storage, &Owner::of(obj), &done.ips, &done.ports).await;
        }
        result
    }

    async fn finish_create(&self, storage: &Storage, obj: &Value, stored: bool, opts: &WriteOptions) {
        if !stored && !opts.dry_run {
            Self::release(storage, &Owner::of(obj), &held_ips(obj), &held_ports(obj)).await;
        }
    }

    async fn begin_update(
        &self,
        storage: &Storage,
        old: &Value,
        new: &mut Value,
        opts: &WriteOptions,
    ) -> ApiResult<()> {
        if !needs_cluster_ip(new) {
            return Ok(());
        }
        let mut done = Reserved::default();
        let result = self.allocate(storage, Some(old), new, opts.dry_run, &mut done).await;
        if result.is_err() {
            Self::release(storage, &Owner::of(new), &done.ips, &done.ports).await;
        }
        result
    }

    async fn finish_update(&self, storage: &Storage, old: &Value, new: &Value, stored: bool, opts: &WriteOptions) {
        if opts.dry_run {
            return;
        }
        // A stored update gives back what the old object had and the new one has not; a
        // failed one what the new one had reserved.
        let (from, kept) = if stored { (old, new) } else { (new, old) };
        let ips: Vec<IpAddr> = held_ips(from).into_iter().filter(|ip| !held_ips(kept).contains(ip)).collect();
        let ports: Vec<u16> = held_ports(from).into_iter().filter(|p| !held_ports(kept).contains(p)).collect();
        Self::release(storage, &Owner::of(old), &ips, &ports).await;
    }

    async fn after_delete(&self, storage: &Storage, obj: &Value) {
        Self::release(storage, &Owner::of(obj), &held_ips(obj), &held_ports(obj)).await;
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::{json, Value};

    use super::*;
    use crate::testing::TestApi;

    const SERVICES: &str = "/api/v1/namespaces/default/services";
    const ADDRESSES: &str = "/apis/networking.k8s.io/v1/ipaddresses";

    async fn api(net: ServiceNetwork) -> TestApi {
        TestApi::start(crate::Settings { service_network: net, ..Default::default() }).await
    }

    fn small() -> ServiceNetwork {
        ServiceNetwork {
            cidrs: vec!["10.96.0.0/24".parse().unwrap()],
            node_ports: 30000..=30009,
            leak_grace: Duration::ZERO,
        }
    }

    fn service(name: &str, spec: Value) -> Option<Value> {
        let mut spec = spec;
        if spec.get("ports").is_none() {
            spec["ports"] = json!([{"port": 80}]);
        }
        Some(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}))
    }

    async fn create(api: &TestApi, name: &str, spec: Value) -> (u16, Value) {
        api.call("x", Method::POST, SERVICES, service(name, spec)).await
    }

    #[tokio::test]
    async fn a_service_gets_a_cluster_ip_held_by_an_ip_address_object() {
        let api = api(small()).await;
        let (code, svc) = create(&api, "web", json!({})).await;
        assert_eq!(code, 201, "{svc}");
        let ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(small().cidrs[0].contains(ip) && ip.to_string() != "10.96.0.1", "{ip}");
        assert_eq!(svc["spec"]["clusterIPs"], json!([ip.to_string()]));
        assert_eq!(
            (svc["spec"]["ipFamilies"].clone(), svc["spec"]["ipFamilyPolicy"].clone()),
            (json!(["IPv4"]), json!("SingleStack"))
        );
        let (code, address) = api.call("x", Method::GET, &format!("{ADDRESSES}/{ip}"), None).await;
        assert_eq!(code, 200, "{address}");
        assert_eq!(
            address["spec"]["parentRef"],
            json!({"resource": "services", "namespace": "default", "name": "web"})
        );
        assert_eq!(address["metadata"]["labels"]["ipaddress.kubernetes.io/managed-by"], "ipallocator.k8s.io");
    }

    #[tokio::test]
    async fn the_kubernetes_service_holds_the_first_address_and_names_the_api_server() {
        let api = api(small()).await;
        let (_, svc) = api.call("x", Method::GET, &format!("{SERVICES}/kubernetes"), None).await;
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(
            svc["spec"]["ports"][0],
            json!({"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443})
        );
        assert_eq!(svc["metadata"]["labels"], json!({"component": "apiserver", "provider": "kubernetes"}));
        let (code, ep) = api.call("x", Method::GET, "/api/v1/namespaces/default/endpoints/kubernetes", None).await;
        assert_eq!(code, 200, "{ep}");
        assert_eq!(ep["subsets"][0]["addresses"][0]["ip"], "127.0.0.1");
        let (_, slice) = api
            .call("x", Method::GET, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes", None)
            .await;
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["127.0.0.1"]));
        assert_eq!(slice["ports"][0]["port"], 6443);
        let (_, cidr) = api.call("x", Method::GET, "/apis/networking.k8s.io/v1/servicecidrs/kubernetes", None).await;
        assert_eq!(cidr["spec"]["cidrs"], json!(["10.96.0.0/24"]));
        assert_eq!(cidr["status"]["conditions"][0]["type"], "Ready");
    }

    #[tokio::test]
    async fn an_address_asked_for_is_honoured_once_and_conflicts_are_refused() {
        let api = api(small()).await;
        assert_eq!(create(&api, "a", json!({"clusterIP": "10.96.0.10"})).await.0, 201);
        let (code, status) = create(&api, "b", json!({"clusterIP": "10.96.0.10"})).await;
        assert_eq!(code, 422);
        assert_eq!(
            status["message"],
            r#"Service "b" is invalid: spec.clusterIPs: Invalid value: ["10.96.0.10"]: failed to allocate IP 10.96.0.10: provided IP is already allocated"#
        );
        let (code, status) = create(&api, "c", json!({"clusterIP": "10.97.0.10"})).await;
        assert_eq!(code, 422);
        assert_eq!(
            status["message"],
            r#"Service "c" is invalid: spec.clusterIPs: Invalid value: ["10.97.0.10"]: failed to allocate IP 10.97.0.10: the provided network does not match the current range"#
        );
        let (_, status) = create(&api, "d", json!({"clusterIP": "10.96.0.255"})).await;
        assert!(status["message"].as_str().unwrap().ends_with(
            "failed to allocate IP 10.96.0.255: the provided IP (10.96.0.255) is not in the valid range. The range of valid IPs is 10.96.0.0/24"
        ), "{status}");
        assert_eq!(api.call("x", Method::GET, &format!("{SERVICES}/b"), None).await.0, 404);
    }

    #[tokio::test]
    async fn deleting_a_service_releases_its_address_and_ports() {
        let api = api(small()).await;
        let (_, svc) = create(
            &api,
            "a",
            json!({"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [{"port": 80, "nodePort": 30005}]}),
        )
        .await;
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30005, "{svc}");
        let (code, deleted) = api.call("x", Method::DELETE, &format!("{SERVICES}/a"), None).await;
        assert_eq!(
            (code, deleted["kind"].as_str()),
            (200, Some("Service")),
            "upstream answers with the deleted Service"
        );
        assert_eq!(api.call("x", Method::GET, &format!("{ADDRESSES}/10.96.0.20"), None).await.0, 404);
        let (code, again) = create(
            &api,
            "b",
            json!({"type": "NodePort", "clusterIP": "10.96.0.20", "ports": [{"port": 80, "nodePort": 30005}]}),
        )
        .await;
        assert_eq!(code, 201, "both were released: {again}");
    }

    #[tokio::test]
    async fn node_ports_come_from_the_range_and_conflicts_are_refused() {
        let api = api(small()).await;
        let (code, svc) = create(&api, "a", json!({"type": "NodePort", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]})).await;
        assert_eq!(code, 201, "{svc}");
        let first = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=30009).contains(&first));
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], first, "one port number, one node port");
        let (code, status) =
            create(&api, "b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": first}]})).await;
        assert_eq!(code, 422);
        assert_eq!(
            status["message"],
            format!(
                r#"Service "b" is invalid: spec.ports[0].nodePort: Invalid value: {first}: provided port is already allocated"#
            )
        );
        let (_, status) = create(&api, "c", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]})).await;
        assert_eq!(
            status["message"],
            r#"Service "c" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-30009"#
        );
        assert_eq!(api.call("x", Method::GET, &format!("{SERVICES}/c"), None).await.0, 404, "nothing stored");
        let (_, kept) = api.call("x", Method::GET, ADDRESSES, None).await;
        assert_eq!(
            kept["items"].as_array().unwrap().len(),
            2,
            "kubernetes and a: the refused ones gave theirs back: {kept}"
        );
    }

    #[tokio::test]
    async fn a_full_range_is_an_internal_error() {
        let net = ServiceNetwork { cidrs: vec!["10.96.0.0/30".parse().unwrap()], ..small() };
        let api = api(net).await;
        // 10.96.0.1 is the kubernetes Service's, 10.96.0.2 the only other usable one.
        assert_eq!(create(&api, "a", json!({})).await.0, 201);
        let (code, status) = create(&api, "b", json!({})).await;
        assert_eq!(
            (code, status["message"].as_str()),
            (500, Some("Internal error occurred: failed to allocate a serviceIP: range is full"))
        );
    }

    #[tokio::test]
    async fn type_changes_allocate_and_release_node_ports() {
        let api = api(small()).await;
        let path = format!("{SERVICES}/a");
        assert_eq!(create(&api, "a", json!({})).await.0, 201);
        let patch = |t: &str| json!({"spec": {"type": t}});
        let (code, svc) = api.call_patch("x", &path, "application/merge-patch+json", patch("NodePort")).await;
        assert_eq!(code, 200, "{svc}");
        let port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        let (code, svc) = api.call_patch("x", &path, "application/merge-patch+json", patch("ClusterIP")).await;
        assert_eq!(code, 200, "{svc}");
        assert!(svc["spec"]["ports"][0].get("nodePort").is_none(), "{svc}");
        let (code, _) = create(&api, "b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": port}]})).await;
        assert_eq!(code, 201, "node port {port} was released");
    }

    #[tokio::test]
    async fn dual_stack_services_get_an_address_of_each_family() {
        let net = ServiceNetwork {
            cidrs: vec!["10.96.0.0/24".parse().unwrap(), "fd00:96::/112".parse().unwrap()],
            ..small()
        };
        let dual = api(net).await;
        let (code, svc) = create(&dual, "a", json!({"ipFamilyPolicy": "PreferDualStack"})).await;
        assert_eq!(code, 201, "{svc}");
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        let ips = svc["spec"]["clusterIPs"].as_array().unwrap();
        assert!(ips[1].as_str().unwrap().starts_with("fd00:96::"), "{svc}");
        let (code, _) = dual.call("x", Method::GET, &format!("{ADDRESSES}/{}", ips[1].as_str().unwrap()), None).await;
        assert_eq!(code, 200);
        let single = api(small()).await;
        let (code, status) = create(&single, "b", json!({"ipFamilyPolicy": "RequireDualStack"})).await;
        assert_eq!(
            (code, status["message"].as_str()),
            (
                422,
                Some(
                    r#"Service "b" is invalid: spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#
                )
            )
        );
    }

    #[tokio::test]
    async fn repair_releases_leaks_and_restores_missing_reservations() {
        let api = api(small()).await;
        let leaked = json!({"apiVersion": "networking.k8s.io/v1", "kind": "IPAddress",
            "metadata": {"name": "10.96.0.99", "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
            "spec": {"parentRef": {"resource": "services", "namespace": "default", "name": "gone"}}});
        assert_eq!(api.call("x", Method::POST, ADDRESSES, Some(leaked)).await.0, 201);
        let (_, svc) = create(&api, "kept", json!({"type": "NodePort"})).await;
        let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert_eq!(api.call("x", Method::DELETE, &format!("{ADDRESSES}/{ip}"), None).await.0, 200);
        let repaired = api.server.allocator.repair(&api.server.storage).await.unwrap();
        assert_eq!(repaired, Repaired { claimed: 1, released: 1 });
        assert_eq!(api.call("x", Method::GET, &format!("{ADDRESSES}/10.96.0.99"), None).await.0, 404);
        let (_, address) = api.call("x", Method::GET, &format!("{ADDRESSES}/{ip}"), None).await;
        assert_eq!(address["spec"]["parentRef"]["name"], "kept");
        let again = api.server.allocator.repair(&api.server.storage).await.unwrap();
        assert_eq!(again, Repaired::default(), "a second pass finds nothing to do");
    }

    #[tokio::test]
    async fn a_dry_run_reserves_nothing() {
        let api = api(small()).await;
        let (code, svc) = api
            .call(
                "x",
                Method::POST,
                &format!("{SERVICES}?dryRun=All"),
                service("a", json!({"clusterIP": "10.96.0.30"})),
            )
            .await;
        assert_eq!(code, 201, "{svc}");
        assert_eq!(api.call("x", Method::GET, &format!("{ADDRESSES}/10.96.0.30"), None).await.0, 404);
        assert_eq!(create(&api, "b", json!({"clusterIP": "10.96.0.30"})).await.0, 201);
    }
}
