//! The Deployment controller (`pkg/controller/deployment`): one ReplicaSet per pod template,
//! named `<deployment>-<template hash>`, the newest carrying the next revision; rollouts by
//! RollingUpdate (bounded by maxSurge and maxUnavailable) or Recreate (old pods gone before new
//! ones start); scaling shared proportionally between the sets of a rollout in progress;
//! `spec.paused`; `progressDeadlineSeconds`; old sets pruned past `revisionHistoryLimit`;
//! every status field and the `Available`, `Progressing` and `ReplicaFailure` conditions that
//! `kubectl rollout status` reads. `kubectl rollout undo` (client side: it copies an old
//! set's template into the Deployment) makes that set new again, with the next revision.
//! Events: `ScalingReplicaSet`.

pub mod util;

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentStatus, ReplicaSet, ReplicaSetSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    chrono::Utc,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use skiff_apimachinery::{
    events::{Kind, Recorder},
    labels,
    pod::{self, controller_ref},
};
use util::*;

use crate::{
    Key,
    informer::{Change, Informer},
    owners,
    queue::Queue,
};

struct Ctx {
    client: Client,
    deployments: Arc<Informer<Deployment>>,
    sets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
    events: Recorder,
}

/// One pass over a Deployment: its sets, split into the new one (matching the template) and
/// the old ones (newest revision last).
struct Pass {
    d: Deployment,
    new: Option<Arc<ReplicaSet>>,
    old: Vec<Arc<ReplicaSet>>,
}

impl Pass {
    fn all(&self) -> impl Iterator<Item = &Arc<ReplicaSet>> {
        self.new.iter().chain(self.old.iter())
    }
}

fn rs_status(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.clone().unwrap_or_default();
    (
        s.replicas,
        s.ready_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
    )
}

impl Ctx {
    fn deployments_api(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn sets_api(&self, ns: &str) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Splits `sets` into new and old for `d`; creates the new one when asked and missing.
    async fn split(
        &self,
        d: &Deployment,
        sets: Vec<Arc<ReplicaSet>>,
        create: bool,
    ) -> anyhow::Result<Pass> {
        let template = d
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut sets = sets;
        sets.sort_by(|a, b| {
            a.creation_timestamp()
                .cmp(&b.creation_timestamp())
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let new_pos = sets.iter().position(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| equal_ignore_hash(t, &template))
        });
        let new = new_pos.map(|i| sets.remove(i));
        let mut old = sets;
        old.sort_by_key(|rs| revision(rs));
        let max_old = max_revision(old.iter().map(|r| &**r));
        let mut d = d.clone();
        let new = match new {
            Some(rs) => Some(self.sync_new_annotations(&d, rs, max_old + 1).await?),
            None if create => {
                let (rs, updated) = self.create_new(&d, &template, &old, max_old + 1).await?;
                d = updated;
                Some(rs)
            }
            None => None,
        };
        // The Deployment carries its newest revision (`SetDeploymentRevision`).
        if let Some(rs) = new.as_ref() {
            let rev = revision(rs).to_string();
            if d.annotations().get(REVISION) != Some(&rev) {
                let patch = json!({"metadata": {"resourceVersion": d.resource_version(), "annotations": {REVISION: rev}}});
                let out = self
                    .deployments_api(&d.namespace().unwrap_or_default())
                    .patch(
                        &d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                self.deployments.cache().observe(out.clone());
                d = out;
            }
        }
        Ok(Pass { d, new, old })
    }

    /// Brings an existing new set's revision and annotations up to date.
    async fn sync_new_annotations(
        &self,
        d: &Deployment,
        rs: Arc<ReplicaSet>,
        rev: i64,
    ) -> anyhow::Result<Arc<ReplicaSet>> {
        let min_ready = d.spec.as_ref().and_then(|s| s.min_ready_seconds);
        let annotations = new_rs_annotations(d, rs.annotations(), rev);
        let min_ready_changed = rs.spec.as_ref().and_then(|s| s.min_ready_seconds) != min_ready;
        if annotations.is_none() && !min_ready_changed {
            return Ok(rs);
        }
        let patch = json!({
            "metadata": {"resourceVersion": rs.resource_version(), "annotations": annotations.unwrap_or_else(|| rs.annotations().clone())},
            "spec": {"minReadySeconds": min_ready},
        });
        let out = self
            .sets_api(&rs.namespace().unwrap_or_default())
            .patch(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        self.sets.cache().observe(out.clone());
        Ok(Arc::new(out))
    }

    async fn create_new(
        &self,
        d: &Deployment,
        template: &k8s_openapi::api::core::v1::PodTemplateSpec,
        old: &[Arc<ReplicaSet>],
        rev: i64,
    ) -> anyhow::Result<(Arc<ReplicaSet>, Deployment)> {
        let ns = d.namespace().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let collisions = d.status.as_ref().and_then(|s| s.collision_count);
        let hash = template_hash(template, collisions);
        let mut template = template.clone();
        template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut selector: LabelSelector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let (surge, _) = fenceposts(d);
        let want = replicas(d);
        // RollingUpdate starts the new set within the surge; Recreate at full size (it only
        // creates the set once the old pods are gone).
        let start = if spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate") {
            want
        } else {
            let current: i32 = old.iter().map(|r| rs_replicas(r)).sum();
            (want + surge - current).clamp(0, want)
        };
        let mut annotations = new_rs_annotations(d, &Default::default(), rev).unwrap_or_default();
        annotations.extend(replicas_annotations(d));
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{}-{hash}", d.name_any())),
                namespace: Some(ns.clone()),
                labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
                annotations: Some(annotations),
                owner_references: Some(vec![owners::controller_reference(d)]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(start),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template.clone()),
            }),
            status: None,
        };
        match self.sets_api(&ns).create(&PostParams::default(), &rs).await {
            Ok(out) => {
                tracing::info!(deployment = %d.name_any(), replicaset = %out.name_any(), "created new ReplicaSet");
                self.sets.cache().observe(out.clone());
                if start > 0 {
                    self.events.object(
                        d,
                        Kind::Normal,
                        "ScalingReplicaSet",
                        &format!("Scaled up replica set {} from 0 to {start}", out.name_any()),
                    );
                }
                let mut status = d.status.clone().unwrap_or_default();
                set_condition(
                    &mut status,
                    new_condition(
                        "Progressing",
                        "True",
                        "NewReplicaSetCreated",
                        format!("Created new replica set \"{}\"", out.name_any()),
                    ),
                );
                let d = self.write_status(d, status).await?;
                Ok((Arc::new(out), d))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Ours already (a cache lagging behind our own create)? Otherwise a hash
                // collision: count it, so the next pass hashes differently.
                let existing = self.sets_api(&ns).get(&rs.name_any()).await?;
                let ours = controller_ref(&existing.metadata)
                    .is_some_and(|r| Some(&r.uid) == d.uid().as_ref());
                let same = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| equal_ignore_hash(t, &template));
                if ours && same {
                    self.sets.cache().observe(existing.clone());
                    return Ok((Arc::new(existing), d.clone()));
                }
                let mut status = d.status.clone().unwrap_or_default();
                status.collision_count = Some(collisions.unwrap_or(0) + 1);
                self.write_status(d, status).await?;
                anyhow::bail!(
                    "hash collision for ReplicaSet {}; retrying with a new hash",
                    rs.name_any()
                )
            }
            Err(e) => {
                let mut status = d.status.clone().unwrap_or_default();
                set_condition(
                    &mut status,
                    new_condition("ReplicaFailure", "True", "FailedCreate", e.to_string()),
                );
                self.write_status(d, status).await?;
                Err(e.into())
            }
        }
    }

    /// Scales `rs` to `to` and records the Deployment's replica annotations on it.
    async fn scale(
        &self,
        d: &Deployment,
        rs: &ReplicaSet,
        to: i32,
    ) -> anyhow::Result<Arc<ReplicaSet>> {
        let from = rs_replicas(rs);
        let annotations: serde_json::Map<String, serde_json::Value> = replicas_annotations(d)
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect();
        let same_annotations = annotations
            .iter()
            .all(|(k, v)| rs.annotations().get(k).map(|s| json!(s)) == Some(v.clone()));
        if from == to && same_annotations {
            return Ok(Arc::new(rs.clone()));
        }
        let patch = json!({
            "metadata": {"resourceVersion": rs.resource_version(), "annotations": annotations},
            "spec": {"replicas": to},
        });
        let out = self
            .sets_api(&rs.namespace().unwrap_or_default())
            .patch(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        self.sets.cache().observe(out.clone());
        if from != to {
            let dir = if to > from { "up" } else { "down" };
            self.events.object(
                d,
                Kind::Normal,
                "ScalingReplicaSet",
                &format!(
                    "Scaled {dir} replica set {} from {from} to {to}",
                    rs.name_any()
                ),
            );
        }
        Ok(Arc::new(out))
    }

    async fn write_status(
        &self,
        d: &Deployment,
        status: DeploymentStatus,
    ) -> anyhow::Result<Deployment> {
        if d.status.as_ref() == Some(&status) {
            return Ok(d.clone());
        }
        let mut updated = d.clone();
        updated.status = Some(status);
        owners::replace_status(&self.client, self.deployments.cache(), &updated).await
    }

    /// The status the sets give (`calculateStatus`), with the Available condition.
    fn calculate_status(&self, p: &Pass) -> DeploymentStatus {
        let d = &p.d;
        let (mut total, mut ready, mut available) = (0, 0, 0);
        for rs in p.all() {
            let (t, r, a) = rs_status(rs);
            total += t;
            ready += r;
            available += a;
        }
        let want = replicas(d);
        let mut s = d.status.clone().unwrap_or_default();
        s.observed_generation = d.metadata.generation;
        s.replicas = Some(total);
        s.updated_replicas = Some(p.new.as_ref().map_or(0, |rs| rs_status(rs).0));
        s.ready_replicas = Some(ready);
        s.available_replicas = Some(available);
        s.unavailable_replicas = Some((want - available).max(0));
        let (_, max_unavailable) = fenceposts(d);
        if available >= want - max_unavailable {
            set_condition(
                &mut s,
                new_condition(
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.".into(),
                ),
            );
        } else {
            set_condition(
                &mut s,
                new_condition(
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.".into(),
                ),
            );
        }
        // Zero counts are omitted, as upstream's omitempty does.
        for f in [
            &mut s.replicas,
            &mut s.updated_replicas,
            &mut s.ready_replicas,
            &mut s.available_replicas,
            &mut s.unavailable_replicas,
        ] {
            if *f == Some(0) {
                *f = None;
            }
        }
        s
    }

    /// Writes the status and the Progressing/ReplicaFailure conditions (`syncRolloutStatus`);
    /// returns when to look again for the progress deadline.
    async fn sync_rollout_status(&self, p: &Pass) -> anyhow::Result<Option<Duration>> {
        let d = &p.d;
        let mut s = self.calculate_status(p);
        let deadline = d.spec.as_ref().and_then(|s| s.progress_deadline_seconds);
        let new_name = p.new.as_ref().map(|r| r.name_any()).unwrap_or_default();
        let paused = d.spec.as_ref().and_then(|s| s.paused) == Some(true);
        let mut again = None;
        match deadline {
            None => remove_condition(&mut s, "Progressing"),
            Some(secs) => {
                let cur = condition(&s, "Progressing").cloned();
                let timed_out_already = cur.as_ref().and_then(|c| c.reason.as_deref())
                    == Some("ProgressDeadlineExceeded");
                if !paused && !timed_out_already {
                    if complete(d, &s) {
                        set_condition(
                            &mut s,
                            new_condition(
                                "Progressing",
                                "True",
                                "NewReplicaSetAvailable",
                                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                            ),
                        );
                    } else if progressing(d, &s) {
                        let mut c = new_condition(
                            "Progressing",
                            "True",
                            "ReplicaSetUpdated",
                            format!("ReplicaSet \"{new_name}\" is progressing."),
                        );
                        if let Some(cur) = cur.as_ref().filter(|c| c.status == "True") {
                            c.last_transition_time = cur.last_transition_time.clone();
                        }
                        remove_condition(&mut s, "Progressing");
                        set_condition(&mut s, c);
                    } else if let Some(cur) = cur
                        .as_ref()
                        .filter(|c| c.reason.as_deref() != Some("NewReplicaSetAvailable"))
                    {
                        let since = cur.last_update_time.as_ref().map_or_else(Utc::now, |t| t.0);
                        if since + k8s_openapi::chrono::Duration::seconds(secs.into()) < Utc::now()
                        {
                            set_condition(
                                &mut s,
                                new_condition(
                                    "Progressing",
                                    "False",
                                    "ProgressDeadlineExceeded",
                                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                                ),
                            );
                        }
                    }
                }
                // A rollout still in progress is looked at again when its deadline passes
                // (`requeueStuckDeployment`).
                let open = condition(&s, "Progressing").filter(|c| {
                    !matches!(
                        c.reason.as_deref(),
                        Some("ProgressDeadlineExceeded" | "NewReplicaSetAvailable")
                    )
                });
                if let (false, false, Some(c)) = (paused, complete(d, &s), open) {
                    let since = c.last_update_time.as_ref().map_or_else(Utc::now, |t| t.0);
                    let ends = since + k8s_openapi::chrono::Duration::seconds(secs.into());
                    again = Some(
                        (ends - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1),
                    );
                }
            }
        }
        let failure = p.new.as_ref().and_then(|rs| {
            rs.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
                .cloned()
        });
        match failure {
            Some(f) => set_condition(
                &mut s,
                new_condition(
                    "ReplicaFailure",
                    "True",
                    f.reason.as_deref().unwrap_or("FailedCreate"),
                    f.message.unwrap_or_default(),
                ),
            ),
            None => remove_condition(&mut s, "ReplicaFailure"),
        }
        self.write_status(d, s).await?;
        Ok(again)
    }

    /// Status only, for a Deployment being deleted or a scaling pass.
    async fn sync_status_only(&self, p: &Pass) -> anyhow::Result<()> {
        let s = self.calculate_status(p);
        self.write_status(&p.d, s).await?;
        Ok(())
    }

    /// Whether the sets were last scaled for another replica count (`isScalingEvent`).
    fn scaling_event(p: &Pass) -> bool {
        let want = replicas(&p.d).to_string();
        p.all().filter(|rs| rs_replicas(rs) > 0).any(|rs| {
            rs.annotations()
                .get(DESIRED_REPLICAS)
                .is_some_and(|v| *v != want)
        })
    }

    /// Scales for a changed replica count (`scale`), proportionally while a rollout runs.
    async fn scale_pass(&self, p: &Pass) -> anyhow::Result<()> {
        let d = &p.d;
        let want = replicas(d);
        let active: Vec<&Arc<ReplicaSet>> = p.all().filter(|rs| rs_replicas(rs) > 0).collect();
        // One active set (or none: the newest) takes the whole count.
        let single = match active.as_slice() {
            [one] => Some((*one).clone()),
            [] => p.new.clone().or_else(|| p.old.last().cloned()),
            _ => None,
        };
        if let Some(rs) = single {
            self.scale(d, &rs, want).await?;
            return Ok(());
        }
        if let Some(new) = p.new.as_ref() {
            let saturated = rs_replicas(new) == want
                && new.annotations().get(DESIRED_REPLICAS) == Some(&want.to_string())
                && rs_status(new).2 == want;
            if saturated {
                for rs in &p.old {
                    self.scale(d, rs, 0).await?;
                }
                return Ok(());
            }
        }
        let rolling = d
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.type_.as_deref())
            != Some("Recreate");
        if !rolling {
            return Ok(());
        }
        let (surge, _) = fenceposts(d);
        let allowed = if want > 0 { want + surge } else { 0 };
        let current: i32 = active.iter().map(|rs| rs_replicas(rs)).sum();
        let to_add = allowed - current;
        let mut sets: Vec<Arc<ReplicaSet>> = active.into_iter().cloned().collect();
        // Larger first; among equals newer first when growing, older first when shrinking.
        sets.sort_by(|a, b| {
            rs_replicas(b).cmp(&rs_replicas(a)).then_with(|| {
                if to_add > 0 {
                    b.creation_timestamp().cmp(&a.creation_timestamp())
                } else {
                    a.creation_timestamp().cmp(&b.creation_timestamp())
                }
            })
        });
        let mut added = 0;
        let mut sizes: Vec<i32> = Vec::new();
        for rs in &sets {
            let share = proportion(d, rs, to_add, added);
            sizes.push(rs_replicas(rs) + share);
            added += share;
        }
        if let Some(first) = sizes.first_mut() {
            *first = (*first + to_add - added).max(0);
        }
        for (rs, size) in sets.iter().zip(sizes) {
            self.scale(d, rs, size.max(0)).await?;
        }
        Ok(())
    }

    /// Deletes old sets beyond `revisionHistoryLimit` that have scaled to zero.
    async fn cleanup(&self, p: &Pass) -> anyhow::Result<()> {
        let Some(limit) = p.d.spec.as_ref().and_then(|s| s.revision_history_limit) else {
            return Ok(());
        };
        let cleanable: Vec<&Arc<ReplicaSet>> = p
            .old
            .iter()
            .filter(|rs| rs.metadata.deletion_timestamp.is_none())
            .collect();
        let excess = cleanable.len().saturating_sub(limit.max(0) as usize);
        for rs in cleanable.into_iter().take(excess) {
            let observed =
                rs.status.as_ref().and_then(|s| s.observed_generation) >= rs.metadata.generation;
            if rs_status(rs).0 != 0 || rs_replicas(rs) != 0 || !observed {
                continue;
            }
            match self
                .sets_api(&rs.namespace().unwrap_or_default())
                .delete(&rs.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(deployment = %p.d.name_any(), replicaset = %rs.name_any(), "deleted an old ReplicaSet past the history limit");
                    self.sets.cache().observe_deleted(rs);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One RollingUpdate step (`rolloutRolling`).
    async fn rolling(&self, p: Pass) -> anyhow::Result<Option<Duration>> {
        let d = &p.d;
        let want = replicas(d);
        let (surge, max_unavailable) = fenceposts(d);
        let Some(new) = p.new.clone() else {
            return self.sync_rollout_status(&p).await;
        };
        // Scale the new set up within the surge.
        let new_count = rs_replicas(&new);
        if new_count != want {
            let target = if new_count > want {
                want
            } else {
                let total: i32 = p.all().map(|rs| rs_replicas(rs)).sum();
                let max_total = want + surge;
                if total >= max_total {
                    new_count
                } else {
                    new_count + (max_total - total).min(want - new_count)
                }
            };
            if target != new_count {
                let new = self.scale(d, &new, target).await?;
                let p = Pass {
                    new: Some(new),
                    ..p
                };
                return self.sync_rollout_status(&p).await;
            }
        }
        // Scale old sets down within the unavailability budget (`reconcileOldReplicaSets`).
        let old_count: i32 = p.old.iter().map(|rs| rs_replicas(rs)).sum();
        if old_count > 0 {
            let all_count: i32 = p.all().map(|rs| rs_replicas(rs)).sum();
            let min_available = want - max_unavailable;
            let new_unavailable = rs_replicas(&new) - rs_status(&new).2;
            let max_scaled_down = all_count - min_available - new_unavailable;
            if max_scaled_down > 0 {
                let mut scaled = 0;
                let mut old: Vec<Arc<ReplicaSet>> = p.old.clone();
                // First the old sets' unavailable pods (oldest sets first)...
                old.sort_by_key(|a| a.creation_timestamp());
                let mut updated = Vec::new();
                for rs in old {
                    let (_, _, avail) = rs_status(&rs);
                    let unhealthy = rs_replicas(&rs) - avail;
                    if scaled >= max_scaled_down || unhealthy <= 0 || rs_replicas(&rs) == 0 {
                        updated.push(rs);
                        continue;
                    }
                    let down = unhealthy.min(max_scaled_down - scaled);
                    let rs2 = self.scale(d, &rs, rs_replicas(&rs) - down).await?;
                    scaled += down;
                    updated.push(rs2);
                }
                // ...then available ones, as far as availability allows.
                let available: i32 = updated
                    .iter()
                    .chain(std::iter::once(&new))
                    .map(|rs| rs_status(rs).2)
                    .sum();
                if available > min_available {
                    let mut budget = available - min_available;
                    for rs in updated.iter_mut() {
                        if budget <= 0 {
                            break;
                        }
                        let n = rs_replicas(rs);
                        if n == 0 {
                            continue;
                        }
                        let down = n.min(budget);
                        *rs = self.scale(d, rs, n - down).await?;
                        budget -= down;
                        scaled += down;
                    }
                }
                if scaled > 0 {
                    let p = Pass {
                        d: p.d.clone(),
                        new: Some(new),
                        old: updated,
                    };
                    return self.sync_rollout_status(&p).await;
                }
            }
        }
        let s = self.calculate_status(&p);
        if complete(d, &s) {
            self.cleanup(&p).await?;
        }
        self.sync_rollout_status(&p).await
    }

    /// One Recreate step (`rolloutRecreate`).
    async fn recreate(
        &self,
        p: Pass,
        sets: Vec<Arc<ReplicaSet>>,
    ) -> anyhow::Result<Option<Duration>> {
        let d = p.d.clone();
        let mut scaled = false;
        let mut old = Vec::new();
        for rs in &p.old {
            if rs_replicas(rs) > 0 {
                old.push(self.scale(&d, rs, 0).await?);
                scaled = true;
            } else {
                old.push(rs.clone());
            }
        }
        if scaled {
            let p = Pass { old, ..p };
            return self.sync_rollout_status(&p).await;
        }
        // Wait until no pod of an old set runs.
        let old_uids: Vec<String> = p.old.iter().filter_map(|rs| rs.uid()).collect();
        let running = self
            .pods
            .cache()
            .list_namespace(&d.namespace().unwrap_or_default())
            .into_iter()
            .any(|pod| {
                !pod::is_terminal(&pod)
                    && controller_ref(&pod.metadata).is_some_and(|r| old_uids.contains(&r.uid))
            });
        if running || p.old.iter().any(|rs| rs_status(rs).0 > 0) {
            return self.sync_rollout_status(&p).await;
        }
        let p = if p.new.is_none() {
            self.split(&d, sets, true).await?
        } else {
            p
        };
        if let Some(new) = p.new.clone() {
            let new = self.scale(&d, &new, replicas(&d)).await?;
            let p = Pass {
                new: Some(new),
                ..p
            };
            let s = self.calculate_status(&p);
            if complete(&d, &s) {
                self.cleanup(&p).await?;
            }
            return self.sync_rollout_status(&p).await;
        }
        self.sync_rollout_status(&p).await
    }
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(d) = ctx.deployments.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    let d = (*d).clone();
    let spec = d.spec.clone().unwrap_or_default();
    if labels::is_empty(&spec.selector) {
        ctx.events.object(
            &d,
            Kind::Warning,
            "SelectorRequired",
            "This deployment is selecting all pods. A non-empty selector is required.",
        );
        let mut s = d.status.clone().unwrap_or_default();
        s.observed_generation = d.metadata.generation;
        ctx.write_status(&d, s).await?;
        return Ok(None);
    }
    let candidates = ctx.sets.cache().list_namespace(&key.namespace);
    let sets = owners::claim(
        &ctx.client,
        ctx.sets.cache(),
        &d,
        &spec.selector,
        candidates,
    )
    .await?;
    if d.metadata.deletion_timestamp.is_some() {
        let p = ctx.split(&d, sets, false).await?;
        ctx.sync_status_only(&p).await?;
        return Ok(None);
    }
    // Paused and resumed are recorded on the Progressing condition.
    let mut d = d;
    if spec.progress_deadline_seconds.is_some() {
        let mut s = d.status.clone().unwrap_or_default();
        let reason = condition(&s, "Progressing").and_then(|c| c.reason.clone());
        if spec.paused == Some(true) && reason.as_deref() != Some("DeploymentPaused") {
            set_condition(
                &mut s,
                new_condition(
                    "Progressing",
                    "Unknown",
                    "DeploymentPaused",
                    "Deployment is paused".into(),
                ),
            );
        } else if spec.paused != Some(true) && reason.as_deref() == Some("DeploymentPaused") {
            set_condition(
                &mut s,
                new_condition(
                    "Progressing",
                    "Unknown",
                    "DeploymentResumed",
                    "Deployment is resumed".into(),
                ),
            );
        }
        d = ctx.write_status(&d, s).await?;
    }
    if spec.paused == Some(true) {
        let p = ctx.split(&d, sets, false).await?;
        ctx.scale_pass(&p).await?;
        ctx.cleanup(&p).await?;
        // `split` may have written the Deployment (its revision): go on from that.
        let d = p.d.clone();
        let p = ctx.split(&d, current_sets(&ctx, &d), false).await?;
        ctx.sync_status_only(&p).await?;
        return Ok(None);
    }
    let probe = ctx.split(&d, sets.clone(), false).await?;
    if Ctx::scaling_event(&probe) {
        ctx.scale_pass(&probe).await?;
        let d = probe.d.clone();
        let p = ctx.split(&d, current_sets(&ctx, &d), false).await?;
        ctx.sync_status_only(&p).await?;
        return Ok(None);
    }
    if spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        ctx.recreate(probe, sets).await
    } else {
        let p = if probe.new.is_none() {
            ctx.split(&d, sets, true).await?
        } else {
            probe
        };
        ctx.rolling(p).await
    }
}

/// The sets `d` controls, from the cache (after this pass's own writes).
fn current_sets(ctx: &Ctx, d: &Deployment) -> Vec<Arc<ReplicaSet>> {
    let uid = d.uid();
    ctx.sets
        .cache()
        .list_namespace(&d.namespace().unwrap_or_default())
        .into_iter()
        .filter(|rs| {
            controller_ref(&rs.metadata)
                .map(|r| Some(&r.uid) == uid.as_ref())
                .unwrap_or(false)
        })
        .collect()
}

/// The Deployment a ReplicaSet change concerns (its controller, or for an orphan those whose
/// selector matches it).
fn deployments_for_set(rs: &ReplicaSet, deployments: &Informer<Deployment>) -> Vec<Key> {
    let ns = rs.namespace().unwrap_or_default();
    match controller_ref(&rs.metadata) {
        Some(r) if r.kind == "Deployment" => vec![Key::new(&ns, &r.name)],
        Some(_) => vec![],
        None => deployments
            .cache()
            .list_namespace(&ns)
            .into_iter()
            .filter(|d| {
                d.spec.as_ref().is_some_and(|s| {
                    !labels::is_empty(&s.selector) && labels::matches(&s.selector, rs.labels())
                })
            })
            .map(|d| Key::of(&*d))
            .collect(),
    }
}

/// Runs the Deployment controller until the process ends.
pub async fn run(
    client: Client,
    deployments: Arc<Informer<Deployment>>,
    sets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut d_changes = deployments.subscribe();
    let mut rs_changes = sets.subscribe();
    let mut pod_changes = pods.subscribe();
    deployments.synced().await;
    sets.synced().await;
    pods.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "deployment-controller", None),
        client,
        deployments: deployments.clone(),
        sets: sets.clone(),
        pods,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = d_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = rs_changes.recv() => {
                    let mut keys = deployments_for_set(c.object(), &deployments);
                    if let Change::Applied { old: Some(old), .. } = &*c {
                        keys.extend(deployments_for_set(old, &deployments));
                    }
                    for k in keys {
                        q.add(k);
                    }
                }
                Some(c) = pod_changes.recv() => {
                    // A Recreate rollout waits for the old pods to go.
                    if let Change::Deleted(p) = &*c
                        && let Some(r) = controller_ref(&p.metadata).filter(|r| r.kind == "ReplicaSet") {
                            let ns = p.namespace().unwrap_or_default();
                            if let Some(rs) = sets.cache().get(&ns, &r.name) {
                                for k in deployments_for_set(&rs, &deployments) {
                                    q.add(k);
                                }
                            }
                        }
                }
                else => return,
            }
        }
    };
    let work = queue.run("deployment", 5, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}
