//! The routing table: an immutable snapshot of every endpoint, its auth and its versions,
//! published whole by the index and read without locking by the request path.
//!
//! Each version carries its [`VersionSlots`], which the index keeps by identity across
//! tables; so swapping the table never resets capacity accounting.

use std::{collections::HashMap, sync::Arc};

use http::HeaderValue;

use super::{
    forward::SendError,
    slots::{Replica, VersionSlots},
};
use crate::{
    config::OutlierDetection,
    error::ClientError,
    metrics::{Metrics, VersionMetrics},
    spec,
};

#[derive(Default)]
pub struct RoutingTable {
    /// Keyed with a fast seeded hash: every request looks its endpoint up here, and only
    /// the config sets the keys, so a client can name but never add one.
    endpoints: HashMap<String, Arc<EndpointRoute>, foldhash::fast::RandomState>,
}

pub struct EndpointRoute {
    pub name: String,
    pub auth: spec::Auth,
    versions: Vec<Arc<VersionRoute>>,
    /// Index of the default version; `None` only when there are no versions.
    default: Option<usize>,
    /// `(upper bound of the roll, version index)` for versions with traffic, cumulative.
    split: Vec<(u32, usize)>,
}

pub struct VersionRoute {
    pub spec: spec::Version,
    pub slots: Arc<VersionSlots>,
    /// The version name as the `azureml-model-deployment` response header.
    pub header: HeaderValue,
    pub metrics: VersionMetrics,
}

impl VersionRoute {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Feeds the transport outcome of one attempt at `replica` to outlier detection; an
    /// ejection it leads to is logged and counted. A failure that was the client's counts
    /// neither way.
    pub fn observe<T>(
        &self,
        replica: &Replica,
        sent: &Result<T, SendError>,
        settings: &OutlierDetection,
    ) {
        let reason = match sent {
            Ok(_) => return replica.succeeded(),
            Err(e) => match e.replica_fault() {
                Some(reason) => reason,
                None => return,
            },
        };
        if let Some(ejection) = self.slots.failed(replica, settings) {
            tracing::warn!(
                endpoint = self.metrics.endpoint(),
                version = self.name(),
                replica = %replica.addr,
                failures = ejection.failures,
                ejections_in_a_row = ejection.nth,
                ejection_ms = ejection.duration.as_millis() as u64,
                last_error = %reason,
                "replica ejected after transport failures in a row"
            );
            self.metrics.count_ejection();
        }
    }
}

impl RoutingTable {
    /// Builds a table; `slots_for` supplies each version's (possibly existing) slots.
    pub fn build(
        endpoints: &[spec::Endpoint],
        metrics: &Metrics,
        mut slots_for: impl FnMut(&spec::Endpoint, &spec::Version) -> Arc<VersionSlots>,
    ) -> Self {
        let endpoints = endpoints
            .iter()
            .map(|ep| {
                let versions: Vec<Arc<VersionRoute>> = ep
                    .versions
                    .iter()
                    .map(|v| {
                        Arc::new(VersionRoute {
                            spec: v.clone(),
                            slots: slots_for(ep, v),
                            header: HeaderValue::from_str(&v.name)
                                .expect("validated names are header-safe"),
                            metrics: metrics.version(&ep.name, &v.name),
                        })
                    })
                    .collect();
                let mut upper = 0;
                let split = versions
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.spec.traffic_percentile > 0)
                    .map(|(i, v)| {
                        upper += v.spec.traffic_percentile;
                        (upper, i)
                    })
                    .collect();
                let route = EndpointRoute {
                    name: ep.name.clone(),
                    auth: ep.auth.clone(),
                    default: versions.iter().position(|v| v.spec.is_default),
                    versions,
                    split,
                };
                (ep.name.clone(), Arc::new(route))
            })
            .collect();
        RoutingTable { endpoints }
    }

    pub fn endpoint(&self, name: &str) -> Option<&Arc<EndpointRoute>> {
        self.endpoints.get(name)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<EndpointRoute>> {
        self.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

impl EndpointRoute {
    pub fn versions(&self) -> &[Arc<VersionRoute>] {
        &self.versions
    }

    /// Chooses the version for a request: the pinned one if `pin` is given (even at 0%),
    /// else by `roll` (uniform in 0..100) over the traffic split, the rest to the default.
    pub fn pick(&self, pin: Option<&[u8]>, roll: u32) -> Result<&Arc<VersionRoute>, ClientError> {
        if let Some(pin) = pin {
            return self
                .versions
                .iter()
                .find(|v| v.spec.name.as_bytes() == pin)
                .ok_or_else(|| ClientError::VersionNotFound {
                    endpoint: self.name.clone(),
                    version: String::from_utf8_lossy(pin).into_owned(),
                });
        }
        let index = self
            .split
            .iter()
            .find(|(upper, _)| roll < *upper)
            .map(|(_, i)| *i)
            .or(self.default)
            .ok_or_else(|| ClientError::NoRoute(self.name.clone()))?;
        Ok(&self.versions[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(split: &[(&str, u32, bool)]) -> spec::Endpoint {
        let versions = split
            .iter()
            .map(|(name, pct, default)| spec::Version {
                name: name.to_string(),
                traffic_percentile: *pct,
                is_default: *default,
                role: spec::Role::Treatment,
                slots_per_replica: 1,
                max_wait: std::time::Duration::from_millis(500),
                max_pending: None,
                scoring_timeout: std::time::Duration::from_secs(60),
                replicas: spec::ReplicaSource::Fixed(vec![]),
                autoscale: None,
            })
            .collect();
        spec::Endpoint {
            name: "ep".into(),
            auth: spec::Auth::None,
            versions,
        }
    }

    fn table(ep: spec::Endpoint) -> RoutingTable {
        RoutingTable::build(&[ep], &Metrics::new(), |_, v| {
            VersionSlots::new(&v.name, 1, None)
        })
    }

    fn shares(t: &RoutingTable) -> Vec<(String, u32)> {
        let ep = t.endpoint("ep").unwrap();
        let mut out: Vec<(String, u32)> = Vec::new();
        for roll in 0..100 {
            let name = ep.pick(None, roll).unwrap().name().to_string();
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => out.push((name, 1)),
            }
        }
        out
    }

    #[test]
    fn rolls_map_to_percentiles_and_the_rest_to_the_default() {
        let t = table(endpoint(&[
            ("blue", 0, true),
            ("green", 10, false),
            ("red", 30, false),
        ]));
        assert_eq!(
            shares(&t),
            [
                ("green".into(), 10),
                ("red".into(), 30),
                ("blue".into(), 60)
            ]
        );
        let t = table(endpoint(&[("blue", 90, true), ("green", 10, false)]));
        assert_eq!(shares(&t), [("blue".into(), 90), ("green".into(), 10)]);
    }

    #[test]
    fn pin_reaches_versions_at_zero_percent_and_unknown_pins_fail() {
        let t = table(endpoint(&[("blue", 100, true), ("dark", 0, false)]));
        let ep = t.endpoint("ep").unwrap();
        assert_eq!(ep.pick(Some(b"dark"), 0).unwrap().name(), "dark");
        assert!(matches!(
            ep.pick(Some(b"nope"), 0),
            Err(ClientError::VersionNotFound { .. })
        ));
    }

    #[test]
    fn an_endpoint_without_versions_has_no_route() {
        let t = table(endpoint(&[]));
        let ep = t.endpoint("ep").unwrap();
        assert!(matches!(ep.pick(None, 5), Err(ClientError::NoRoute(_))));
    }
}
