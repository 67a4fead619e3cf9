//! The test Kubernetes API server (`support::kubeapi`) driven by the real kube client:
//! paged label-selected lists, kube's runtime watcher through creates, updates and deletes
//! and through a compaction while the server was away, raw watches with bookmarks, a
//! timeout and a label selection, server-side apply on a custom resource's status with
//! field-manager conflicts, the Deployment scale subresource, and 401/403 answers.

mod support;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::api::{apps::v1::Deployment, discovery::v1::EndpointSlice};
use kube::{
    Api, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams, WatchEvent, WatchParams,
    },
    runtime::{
        WatchStreamExt,
        watcher::{self, Event, watcher},
    },
};
use serde_json::{Value, json};
use support::kubeapi::*;

const NS: &str = "models";

/// How long one step of a test may take before it fails.
const PATIENCE: Duration = Duration::from_secs(5);

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// A slice of service `svc` with one ready endpoint.
fn slice(name: &str) -> Value {
    endpoint_slice(
        NS,
        name,
        "svc",
        Some("http"),
        8080,
        &[("10.0.0.1", true, true, false)],
    )
}

fn slices(api: &KubeApi) -> Api<EndpointSlice> {
    Api::namespaced(api.client(), NS)
}

fn scoring_endpoint_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("scorefront.io", "v1", "ScoringEndpoint");
    ApiResource::from_gvk_with_plural(&gvk, "scoringendpoints")
}

fn scoring_endpoints(api: &KubeApi) -> Api<DynamicObject> {
    Api::namespaced_with(api.client(), NS, &scoring_endpoint_resource())
}

/// The watcher's next event; an error or a silence of [`PATIENCE`] fails the test.
async fn next<K>(events: &mut Events<K>) -> Event<K> {
    tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("a watch event in time")
        .expect("the watcher goes on")
        .expect("no watch error")
}

/// Reads a relist (`Init`, `InitApply`..., `InitDone`) and returns the names it listed,
/// with the errors seen before it.
async fn relist<K: ResourceExt>(events: &mut Events<K>) -> (Vec<watcher::Error>, Vec<String>) {
    let mut errors = Vec::new();
    loop {
        let event = tokio::time::timeout(PATIENCE, events.next()).await;
        match event
            .expect("a watch event in time")
            .expect("the watcher goes on")
        {
            Ok(Event::Init) => break,
            Ok(_) => panic!("an event other than Init before the relist"),
            Err(e) => errors.push(e),
        }
    }
    let mut names = Vec::new();
    loop {
        match next(events).await {
            Event::InitApply(obj) => names.push(obj.name_any()),
            Event::InitDone => return (errors, names),
            _ => panic!("an event other than InitApply inside a relist"),
        }
    }
}

/// The `kube::Error::Api` status of a failed call.
#[track_caller]
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("want an API error status, got {other:?}"),
    }
}

#[tokio::test]
async fn list_pages_through_a_label_selection() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    for name in ["s3", "s1", "s4", "s0", "s2"] {
        api.apply(slice(name));
    }
    let mut unlabelled = slice("unlabelled");
    unlabelled["metadata"]["labels"] = json!({});
    api.apply(unlabelled);
    api.apply(endpoint_slice(NS, "other", "other-svc", None, 80, &[]));

    let mut lp = ListParams::default()
        .labels("kubernetes.io/service-name")
        .limit(2);
    let (mut names, mut pages) = (Vec::new(), 0);
    loop {
        let page = slices(&api).list(&lp).await?;
        pages += 1;
        let rv = page.metadata.resource_version.unwrap_or_default();
        assert!(!rv.is_empty(), "page {pages} has a resourceVersion");
        assert!(page.items.iter().all(|s| s.metadata.uid.is_some()));
        names.extend(page.items.iter().map(|s| s.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names, ["other", "s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(pages, 3);

    // Equality, inequality and absence, across all namespaces.
    let all: Api<EndpointSlice> = Api::all(api.client());
    let named = |lp: ListParams| {
        let all = all.clone();
        async move {
            let list = all.list(&lp).await.unwrap();
            list.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
        }
    };
    let svc = ListParams::default().labels("kubernetes.io/service-name=svc,app!=x");
    assert_eq!(named(svc).await, ["s0", "s1", "s2", "s3", "s4"]);
    let no_svc = ListParams::default().labels("!kubernetes.io/service-name");
    assert_eq!(named(no_svc).await, ["unlabelled"]);

    // The selector travelled URL-encoded and was decoded.
    let lists = api.requests();
    let last = lists.last().unwrap();
    assert!(
        last.path
            .ends_with("/apis/discovery.k8s.io/v1/endpointslices")
    );
    assert_eq!(
        last.param("labelSelector"),
        Some("!kubernetes.io/service-name")
    );
    Ok(())
}

#[tokio::test]
async fn watcher_sees_the_initial_list_then_each_change() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    api.apply(slice("a"));
    let slices = slices(&api);
    let mut events: Events<EndpointSlice> =
        watcher(slices.clone(), watcher::Config::default()).boxed();

    assert!(matches!(next(&mut events).await, Event::Init));
    assert!(matches!(next(&mut events).await, Event::InitApply(s) if s.name_any() == "a"));
    assert!(matches!(next(&mut events).await, Event::InitDone));

    let b: EndpointSlice = serde_json::from_value(slice("b"))?;
    slices.create(&PostParams::default(), &b).await?;
    match next(&mut events).await {
        Event::Apply(s) => {
            assert_eq!(s.name_any(), "b");
            assert_eq!(s.endpoints[0].addresses, ["10.0.0.1"]);
        }
        other => panic!("want Apply(b), got {other:?}"),
    }

    let not_ready =
        json!({"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]});
    slices
        .patch("b", &PatchParams::default(), &Patch::Merge(&not_ready))
        .await?;
    match next(&mut events).await {
        Event::Apply(s) => {
            let conditions = s.endpoints[0].conditions.as_ref().unwrap();
            assert_eq!(
                (s.name_any().as_str(), conditions.ready),
                ("b", Some(false))
            );
        }
        other => panic!("want Apply(b) not ready, got {other:?}"),
    }

    slices.delete("b", &DeleteParams::default()).await?;
    assert!(matches!(next(&mut events).await, Event::Delete(s) if s.name_any() == "b"));
    // A change made behind the client's back reaches it too.
    api.delete("endpointslices", NS, "a");
    assert!(matches!(next(&mut events).await, Event::Delete(s) if s.name_any() == "a"));
    Ok(())
}

#[tokio::test]
async fn watcher_relists_after_the_history_it_needs_was_compacted() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    api.apply(slice("a"));
    api.apply(slice("b"));
    let mut events: Events<EndpointSlice> = watcher(slices(&api), watcher::Config::default())
        .default_backoff()
        .boxed();
    let (errors, names) = relist(&mut events).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(names, ["a", "b"]);

    // The API server goes away; while it is away its history moves on past the watcher.
    api.stop().await;
    let refused = slices(&api).list(&ListParams::default()).await;
    assert!(
        matches!(&refused, Err(e) if !matches!(e, kube::Error::Api(_))),
        "a stopped server does not answer: {refused:?}"
    );
    api.compact();
    api.delete("endpointslices", NS, "a");
    api.apply(slice("c"));
    api.restart().await;

    let (errors, names) = relist(&mut events).await;
    assert_eq!(names, ["b", "c"]);
    let expired = errors.iter().any(
        |e| matches!(e, watcher::Error::WatchError(s) if s.code == 410 && s.reason == "Expired"),
    );
    assert!(
        expired,
        "the resumed watch was told 410 Expired: {errors:?}"
    );

    // And it watches on from the new list.
    api.apply(slice("d"));
    assert!(matches!(next(&mut events).await, Event::Apply(s) if s.name_any() == "d"));
    Ok(())
}

#[tokio::test]
async fn raw_watch_sends_bookmarks_and_ends_at_its_timeout() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    api.set_bookmark_interval(Duration::from_millis(100));
    let stored = api.apply(slice("a"));
    let started = tokio::time::Instant::now();
    let stream = slices(&api)
        .watch(&WatchParams::default().timeout(1), "0")
        .await?;
    let events: Vec<WatchEvent<EndpointSlice>> =
        tokio::time::timeout(PATIENCE, stream.try_collect()).await??;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(matches!(&events[0], WatchEvent::Added(s) if s.name_any() == "a"));
    let rv = stored["metadata"]["resourceVersion"].as_str().unwrap();
    let bookmarks = events
        .iter()
        .filter(|e| matches!(e, WatchEvent::Bookmark(b) if b.metadata.resource_version == rv));
    assert!(bookmarks.count() >= 2, "{events:?}");
    Ok(())
}

#[tokio::test]
async fn watch_follows_objects_into_and_out_of_its_label_selection() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    let slices = slices(&api);
    api.apply(slice("a"));
    let rv = slices
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version;
    let wp = WatchParams::default().labels("kubernetes.io/service-name=svc");
    let mut stream = slices.watch(&wp, &rv.unwrap()).await?.boxed();
    let mut next_change = async || loop {
        let event = tokio::time::timeout(PATIENCE, stream.try_next()).await;
        match event
            .expect("a watch event in time")
            .unwrap()
            .expect("the watch goes on")
        {
            WatchEvent::Bookmark(_) => continue,
            other => return other,
        }
    };

    let relabel =
        |service: &str| json!({"metadata": {"labels": {"kubernetes.io/service-name": service}}});
    let pp = PatchParams::default();
    slices
        .patch("a", &pp, &Patch::Merge(relabel("elsewhere")))
        .await?;
    match next_change().await {
        // It leaves with the last state it matched in.
        WatchEvent::Deleted(s) => assert_eq!(s.labels()["kubernetes.io/service-name"], "svc"),
        other => panic!("want DELETED, got {other:?}"),
    }
    slices
        .patch("a", &pp, &Patch::Merge(relabel("svc")))
        .await?;
    assert!(matches!(next_change().await, WatchEvent::Added(s) if s.name_any() == "a"));
    api.apply(slice("b"));
    assert!(matches!(next_change().await, WatchEvent::Added(s) if s.name_any() == "b"));
    slices
        .patch("b", &pp, &Patch::Merge(json!({"addressType": "IPv6"})))
        .await?;
    assert!(matches!(next_change().await, WatchEvent::Modified(s) if s.address_type == "IPv6"));
    Ok(())
}

#[tokio::test]
async fn status_apply_keeps_generation_and_conflicts_between_managers() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    let spec = json!({"versions": [{"name": "blue"}]});
    api.apply(scoring_endpoint(NS, "e", spec));
    let endpoints = scoring_endpoints(&api);
    let before = endpoints.get("e").await?;
    assert_eq!(before.metadata.generation, Some(1));

    // The spec in these patches must not reach the object through /status.
    let status = |phase: &str| {
        Patch::Apply(json!({
            "apiVersion": "scorefront.io/v1",
            "kind": "ScoringEndpoint",
            "spec": {"versions": []},
            "status": {"phase": phase, "readyReplicas": 2},
        }))
    };
    let (router, other) = (PatchParams::apply("router"), PatchParams::apply("other"));
    let applied = endpoints
        .patch_status("e", &router, &status("Ready"))
        .await?;
    assert_eq!(applied.data["status"]["phase"], "Ready");
    assert_eq!(applied.data["spec"], before.data["spec"]);
    assert_eq!(applied.metadata.generation, Some(1));
    let rv = applied.metadata.resource_version;
    assert_ne!(rv, before.metadata.resource_version);

    // Applying the same again changes nothing, not even the resourceVersion.
    let again = endpoints
        .patch_status("e", &router, &status("Ready"))
        .await?;
    assert_eq!(again.metadata.resource_version, rv);

    // Another manager may agree with the owner, but not contradict it unforced.
    endpoints
        .patch_status("e", &other, &status("Ready"))
        .await?;
    let conflict = api_error(endpoints.patch_status("e", &other, &status("Failed")).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    let message = &conflict.message;
    assert!(message.contains(r#"conflict with "router""#), "{message}");
    assert!(message.contains(".status.phase"), "{message}");
    let forced = endpoints
        .patch_status("e", &other.clone().force(), &status("Failed"))
        .await?;
    assert_eq!(forced.data["status"]["phase"], "Failed");
    // Now the first manager is the one contradicting.
    let conflict = api_error(endpoints.patch_status("e", &router, &status("Ready")).await);
    let message = &conflict.message;
    assert!(message.contains(r#"conflict with "other""#), "{message}");

    // A spec change through the main resource bumps the generation and keeps the status.
    let respec = Patch::Apply(json!({
        "apiVersion": "scorefront.io/v1",
        "kind": "ScoringEndpoint",
        "spec": {"versions": [{"name": "green"}]},
        "status": {"phase": "Ignored"},
    }));
    let respecced = endpoints.patch("e", &router, &respec).await?;
    assert_eq!(respecced.metadata.generation, Some(2));
    assert_eq!(respecced.data["status"]["phase"], "Failed");
    // Apply needs a field manager; a missing object has no status to apply to.
    let unmanaged = endpoints.patch("e", &PatchParams::default(), &respec).await;
    assert_eq!(api_error(unmanaged).code, 400);
    let missing = endpoints
        .patch_status("nope", &router, &status("Ready"))
        .await;
    assert_eq!(api_error(missing).code, 404);

    // What was sent, as the server saw it.
    let status_patches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/scoringendpoints/e/status"))
        .collect();
    assert_eq!(status_patches.len(), 6);
    let first = &status_patches[0];
    let content_type = first.content_type.as_deref();
    assert_eq!(content_type, Some("application/apply-patch+yaml"));
    assert_eq!(first.param("fieldManager"), Some("router"));
    let sent = first.json();
    assert_eq!(
        sent["status"],
        json!({"phase": "Ready", "readyReplicas": 2})
    );
    assert_eq!(status_patches[4].param("force"), Some("true"));
    Ok(())
}

#[tokio::test]
async fn scale_subresource_reads_and_writes_the_deployment_replicas() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    let mut model = deployment(NS, "model", 1);
    model["status"] = json!({"replicas": 1});
    api.apply(model);
    let deployments: Api<Deployment> = Api::namespaced(api.client(), NS);

    let scale = deployments.get_scale("model").await?;
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    let status = scale.status.unwrap();
    assert_eq!(
        (status.replicas, status.selector.as_deref()),
        (1, Some("app=model"))
    );

    let patch = Patch::Merge(json!({"spec": {"replicas": 3}}));
    let scaled = deployments
        .patch_scale("model", &PatchParams::default(), &patch)
        .await?;
    assert_eq!(scaled.spec.unwrap().replicas, Some(3));
    let stored = deployments.get("model").await?;
    assert_eq!(stored.spec.unwrap().replicas, Some(3));
    assert_eq!(stored.metadata.generation, Some(2));
    assert_eq!(
        stored.status.unwrap().replicas,
        Some(1),
        "status is the controller's"
    );

    let missing = deployments
        .patch_scale("gone", &PatchParams::default(), &patch)
        .await;
    assert_eq!(api_error(missing).code, 404);
    let sent = api.requests();
    let scale_patch = sent.iter().find(|r| r.method == "PATCH").unwrap();
    assert_eq!(
        scale_patch.path,
        format!("/apis/apps/v1/namespaces/{NS}/deployments/model/scale")
    );
    assert_eq!(scale_patch.json(), json!({"spec": {"replicas": 3}}));
    Ok(())
}

#[tokio::test]
async fn denied_and_unauthenticated_requests_get_statuses() -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    api.apply(scoring_endpoint(NS, "e", json!({})));
    api.deny("list", "scoringendpoints", Some(NS));
    let endpoints = scoring_endpoints(&api);

    let denied = api_error(endpoints.list(&ListParams::default()).await);
    assert_eq!((denied.code, denied.reason.as_str()), (403, "Forbidden"));
    let message = format!(
        "scoringendpoints.scorefront.io is forbidden: User \"{USER}\" cannot list resource \
         \"scoringendpoints\" in API group \"scorefront.io\" in the namespace \"{NS}\""
    );
    assert_eq!(denied.message, message);
    // Only that verb: a get still works.
    assert_eq!(endpoints.get("e").await?.name_any(), "e");
    // kube's watcher reports Init first, then the failed list.
    let mut events = watcher(endpoints.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut events).await, Event::Init));
    let failed = tokio::time::timeout(PATIENCE, events.next())
        .await?
        .unwrap();
    assert!(
        matches!(&failed, Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403),
        "{failed:?}"
    );
    api.allow_all();
    assert_eq!(endpoints.list(&ListParams::default()).await?.items.len(), 1);

    api.require_token(Some("another-token"));
    let unauthorized = api_error(endpoints.get("e").await);
    assert_eq!(
        (unauthorized.code, unauthorized.reason.as_str()),
        (401, "Unauthorized")
    );
    // A client built now presents the required token.
    assert_eq!(scoring_endpoints(&api).get("e").await?.name_any(), "e");

    // The kubeconfig names the same server and token.
    let dir = tempfile::tempdir()?;
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig(dir.path()))?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_from(config)?;
    let from_file: Api<DynamicObject> =
        Api::namespaced_with(client, NS, &scoring_endpoint_resource());
    assert_eq!(from_file.get("e").await?.name_any(), "e");
    Ok(())
}

#[tokio::test]
async fn wire_format_matches_the_real_server() {
    let api = KubeApi::start().await;
    let stored = api.apply(slice("a"));
    let rv = stored["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let base = format!(
        "{}/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
        api.url()
    );

    let (parts, body) = support::get(&base).await;
    assert_eq!(parts.status, 200);
    let list = support::json(&body);
    assert_eq!(
        (&list["apiVersion"], &list["kind"]),
        (&json!("discovery.k8s.io/v1"), &json!("EndpointSliceList"))
    );
    assert_eq!(list["metadata"]["resourceVersion"], json!(rv));
    // Items come without apiVersion and kind, with the metadata the server keeps.
    let item = list["items"][0].as_object().unwrap();
    assert!(!item.contains_key("apiVersion") && !item.contains_key("kind"));
    let meta = &item["metadata"];
    assert_eq!(
        (&meta["namespace"], &meta["generation"]),
        (&json!(NS), &json!(1))
    );
    assert!(!meta["uid"].as_str().unwrap().is_empty());
    let created = meta["creationTimestamp"].as_str().unwrap();
    assert!(created.len() == 20 && created.ends_with('Z'), "{created}");

    let (parts, body) = support::get(&format!("{base}/nope")).await;
    assert_eq!(parts.status, 404);
    assert_eq!(
        support::json(&body),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "endpointslices.discovery.k8s.io \"nope\" not found",
            "reason": "NotFound", "code": 404,
            "details": {"name": "nope", "group": "discovery.k8s.io", "kind": "endpointslices"},
        })
    );

    // A watch from before a compaction: 200, then one in-stream 410, then the end.
    api.compact();
    let (parts, body) = support::get(&format!("{base}?watch=1&resourceVersion={rv}")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(parts.headers["transfer-encoding"], "chunked");
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<Value> = text.lines().map(|l| support::json(l.as_bytes())).collect();
    assert_eq!(events.len(), 1, "{text}");
    let error = &events[0];
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        (&error["object"]["code"], &error["object"]["reason"]),
        (&json!(410), &json!("Expired"))
    );
    let message = error["object"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("too old resource version: {rv} (")));
}
