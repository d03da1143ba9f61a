//! Per-kind REST behaviour beyond what a pure `Strategy` can say, registered with the
//! kind (as upstream's per-kind registry stores with their REST hooks):
//! - [`Hooks`]: stateful create/update/delete hooks with access to the storage
//!   (upstream's BeginCreate/BeginUpdate/AfterDelete), so that allocators can reserve
//!   what a new object needs and release it when the object goes or is never stored.
//! - [`Handler`]: subresources (and resources) served by code of their own, such as
//!   `pods/binding`, `pods/eviction`, `pods/exec` or `serviceaccounts/token`. The kinds
//!   table declares them (`KindInfo::subresources`, `KindInfo::handler`); [`handler`]
//!   maps each declaration to its implementation in the kind's module here.
//!
//! The generic path (`registry.rs`, `http/mod.rs`) knows no kind by name.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use http::{Request, Response};
use krate_api::kinds::SubresourceHandler;
use krate_api::{ApiResult, StorageResource};
use serde_json::Value;

use crate::http::negotiate::Format;
use crate::http::Query;
use crate::registry::{Scope, Storage, WriteOptions};
use crate::request::RequestAttributes;
use crate::ApiServer;

mod certificates;
mod componentstatuses;
mod namespaces;
pub use certificates::{CsrHooks, PodCertificateHooks};
pub mod pods;
pub(crate) mod proxy;
pub mod resourcemetrics;
mod reviews;
pub mod serviceaccounts;
pub mod services;

/// Stateful per-kind hooks around the generic writes. Each `begin_*` that succeeds is
/// followed by exactly one `finish_*` with whether the write was stored (or, on a dry
/// run, would have been), so that a hook can release what it reserved for a write that
/// did not happen. `after_delete` runs once the object is gone from the store.
#[async_trait::async_trait]
pub trait Hooks: Send + Sync {
    /// Before a new object is stored (after validation and admission): may fill fields
    /// (an allocated address) or refuse the object.
    async fn begin_create(&self, _storage: &Storage, _obj: &mut Value, _opts: &WriteOptions) -> ApiResult<()> {
        Ok(())
    }
    async fn finish_create(&self, _storage: &Storage, _obj: &Value, _stored: bool, _opts: &WriteOptions) {}

    /// Before a changed object replaces `old` in the store.
    async fn begin_update(
        &self,
        _storage: &Storage,
        _old: &Value,
        _new: &mut Value,
        _opts: &WriteOptions,
    ) -> ApiResult<()> {
        Ok(())
    }
    async fn finish_update(&self, _storage: &Storage, _old: &Value, _new: &Value, _stored: bool, _opts: &WriteOptions) {
    }

    /// After `obj` was removed from the store.
    async fn after_delete(&self, _storage: &Storage, _obj: &Value) {}
}

/// The hooks of every kind that has some, by where the kind is stored (so all served
/// versions of a kind share them).
#[derive(Clone, Default)]
pub struct HookTable(HashMap<StorageResource, Arc<dyn Hooks>>);

impl HookTable {
    /// Hooks for the kind stored as the k8s-openapi type `T`.
    pub fn register<T: k8s_openapi::Resource>(&mut self, hooks: Arc<dyn Hooks>) {
        self.0.insert(StorageResource::of::<T>(), hooks);
    }

    pub fn get(&self, storage: &StorageResource) -> Option<&Arc<dyn Hooks>> {
        self.0.get(storage)
    }
}

impl std::fmt::Debug for HookTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys().map(|k| format!("{}/{}", k.group, k.resource))).finish()
    }
}

/// A request for a subresource (or a handled resource), routed and authorized.
pub struct Call<'a> {
    pub server: &'a Arc<ApiServer>,
    pub attrs: &'a Arc<RequestAttributes>,
    /// The kind the URL names, in the URL's namespace.
    pub scope: Scope,
    /// The object the URL names ("" for a handled resource such as `bindings`).
    pub name: &'a str,
    pub query: &'a Query,
    pub format: Format,
    pub req: Request<Body>,
}

/// Serves one subresource.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>>;
}

/// Answers a read of a resource a handler works out on each request rather than
/// stores (`componentstatuses`, metrics.k8s.io): the object the call names, or
/// `not_found`, or the whole list; as JSON or as a Table, as the client asked.
pub(crate) fn read_answer(
    call: &Call<'_>,
    items: Vec<Value>,
    not_found: impl FnOnce() -> krate_api::ApiError,
) -> ApiResult<Response<Body>> {
    use crate::http::{json_response, table};
    let kind = &call.scope.kind;
    if !call.name.is_empty() {
        let item = items.into_iter().find(|i| i["metadata"]["name"] == call.name).ok_or_else(not_found)?;
        return Ok(match call.format {
            Format::Table { .. } => json_response(200, &table::object_table(kind, &item)),
            _ => json_response(200, &item),
        });
    }
    Ok(match call.format {
        Format::Table { include_object } => json_response(200, &table::list_table(kind, &items, include_object)),
        _ => json_response(
            200,
            &serde_json::json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": {}, "items": items}),
        ),
    })
}

/// A declared subresource the generic path serves.
struct Unrouted;

#[async_trait::async_trait]
impl Handler for Unrouted {
    async fn serve(&self, _: Call<'_>) -> ApiResult<Response<Body>> {
        Err(krate_api::ApiError::no_such_path())
    }
}

/// The implementation of a declared subresource handler.
pub fn handler(declared: SubresourceHandler) -> &'static dyn Handler {
    use SubresourceHandler as H;
    match declared {
        H::Finalize => &namespaces::Finalize,
        H::Binding => &pods::Binding,
        H::Eviction => &pods::Eviction,
        H::Log => &pods::Log,
        H::Exec => &pods::Connect(pods::Action::Exec),
        H::Attach => &pods::Connect(pods::Action::Attach),
        H::PortForward => &pods::Connect(pods::Action::PortForward),
        H::Token => &serviceaccounts::Token,
        H::Proxy => &proxy::Proxy,
        H::ComponentStatuses => &componentstatuses::ComponentStatuses,
        H::Review => &reviews::Review,
        H::ResourceMetrics => &resourcemetrics::ResourceMetrics,
        // The generic path serves it (`http::target`); nothing routes it here.
        H::Approval | H::EphemeralContainers | H::Resize => &Unrouted,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use http::Method;
    use k8s_openapi::api::core::v1::ConfigMap;
    use krate_api::object;
    use krate_api::ApiError;
    use serde_json::json;

    use super::*;
    use crate::testing::TestApi;

    /// A toy allocator on ConfigMaps: each claims the address in `data.address`, and gets
    /// the next free one when it names none.
    #[derive(Default)]
    struct Addresses {
        taken: Mutex<BTreeSet<u32>>,
        /// Every finish call, as (operation, stored).
        finished: Mutex<Vec<(&'static str, bool)>>,
    }

    fn address(obj: &Value) -> Option<u32> {
        obj.pointer("/data/address").and_then(Value::as_str).and_then(|a| a.parse().ok())
    }

    #[async_trait::async_trait]
    impl Hooks for Addresses {
        async fn begin_create(&self, _: &Storage, obj: &mut Value, _: &WriteOptions) -> ApiResult<()> {
            let mut taken = self.taken.lock().unwrap();
            let wanted = address(obj).unwrap_or_else(|| (1..).find(|a| !taken.contains(a)).unwrap());
            if !taken.insert(wanted) {
                return Err(ApiError::invalid(
                    "",
                    "ConfigMap",
                    object::name(obj),
                    &[krate_api::FieldError::invalid(
                        "data.address",
                        &json!(wanted.to_string()),
                        "provided address is already allocated",
                    )],
                ));
            }
            object::set(obj, &["data", "address"], json!(wanted.to_string()));
            Ok(())
        }

        async fn finish_create(&self, _: &Storage, obj: &Value, stored: bool, _: &WriteOptions) {
            self.finished.lock().unwrap().push(("create", stored));
            if !stored {
                self.taken.lock().unwrap().remove(&address(obj).unwrap());
            }
        }

        async fn begin_update(&self, _: &Storage, old: &Value, new: &mut Value, _: &WriteOptions) -> ApiResult<()> {
            // The address is kept whatever the update says.
            object::set(new, &["data", "address"], old["data"]["address"].clone());
            Ok(())
        }

        async fn finish_update(&self, _: &Storage, _: &Value, _: &Value, stored: bool, _: &WriteOptions) {
            self.finished.lock().unwrap().push(("update", stored));
        }

        async fn after_delete(&self, _: &Storage, obj: &Value) {
            self.taken.lock().unwrap().remove(&address(obj).unwrap());
        }
    }

    async fn api() -> (TestApi, Arc<Addresses>) {
        let addresses = Arc::new(Addresses::default());
        let mut hooks = HookTable::default();
        hooks.register::<ConfigMap>(addresses.clone());
        (TestApi::start(crate::Settings { hooks, ..Default::default() }).await, addresses)
    }

    fn config_map(name: &str, address: Option<&str>) -> Option<Value> {
        let data = address.map(|a| json!({"address": a})).unwrap_or(json!({}));
        Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}))
    }

    const CONFIG_MAPS: &str = "/api/v1/namespaces/default/configmaps";

    #[tokio::test]
    async fn a_create_hook_fills_in_what_it_allocates() {
        let (api, _) = api().await;
        let (code, created) = api.call("x", Method::POST, CONFIG_MAPS, config_map("a", None)).await;
        assert_eq!((code, created["data"]["address"].as_str()), (201, Some("1")), "{created}");
        let (_, stored) = api.call("x", Method::GET, &format!("{CONFIG_MAPS}/a"), None).await;
        assert_eq!(stored["data"]["address"], "1");
    }

    #[tokio::test]
    async fn a_create_hook_that_fails_leaves_nothing_stored() {
        let (api, _) = api().await;
        assert_eq!(api.call("x", Method::POST, CONFIG_MAPS, config_map("a", Some("7"))).await.0, 201);
        let (code, status) = api.call("x", Method::POST, CONFIG_MAPS, config_map("b", Some("7"))).await;
        assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")), "{status}");
        assert_eq!(
            status["message"],
            r#"ConfigMap "b" is invalid: data.address: Invalid value: "7": provided address is already allocated"#
        );
        assert_eq!(api.call("x", Method::GET, &format!("{CONFIG_MAPS}/b"), None).await.0, 404, "nothing stored");
    }

    #[tokio::test]
    async fn what_a_hook_reserved_is_released_when_the_store_refuses_the_object() {
        let (api, addresses) = api().await;
        assert_eq!(api.call("x", Method::POST, CONFIG_MAPS, config_map("a", None)).await.0, 201);
        // Same name: the hook reserves address 2, the store refuses the duplicate name.
        let (code, _) = api.call("x", Method::POST, CONFIG_MAPS, config_map("a", None)).await;
        assert_eq!(code, 409);
        assert_eq!(*addresses.finished.lock().unwrap(), [("create", true), ("create", false)]);
        assert_eq!(*addresses.taken.lock().unwrap(), BTreeSet::from([1]), "address 2 released");
        let (_, created) = api.call("x", Method::POST, CONFIG_MAPS, config_map("b", None)).await;
        assert_eq!(created["data"]["address"], "2");
    }

    #[tokio::test]
    async fn update_hooks_see_both_objects_and_delete_releases() {
        let (api, addresses) = api().await;
        assert_eq!(api.call("x", Method::POST, CONFIG_MAPS, config_map("a", Some("5"))).await.0, 201);
        let (code, updated) = api.call("x", Method::PUT, &format!("{CONFIG_MAPS}/a"), config_map("a", Some("9"))).await;
        assert_eq!((code, updated["data"]["address"].as_str()), (200, Some("5")), "{updated}");
        assert_eq!(addresses.finished.lock().unwrap().last(), Some(&("update", true)));
        assert_eq!(api.call("x", Method::DELETE, &format!("{CONFIG_MAPS}/a"), None).await.0, 200);
        assert!(addresses.taken.lock().unwrap().is_empty(), "released after the delete");
    }
}
