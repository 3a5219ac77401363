//! The Job controller (`pkg/controller/job`): runs pods from the template until `completions`
//! succeed (`NonIndexed`: any pods; `Indexed`: one per index 0…n-1, each pod told its index
//! through the `batch.kubernetes.io/job-completion-index` annotation and label, the
//! `JOB_COMPLETION_INDEX` variable and its hostname), at most `parallelism` at a time; without
//! `completions`, until one succeeds and the rest have finished (a work queue). Failed pods are
//! replaced after a backoff (10 s doubling to 6 min) until `backoffLimit` failures (container
//! restarts count for `restartPolicy: OnFailure`), or until `activeDeadlineSeconds` from
//! `startTime`; then the Job fails (`BackoffLimitExceeded`, `DeadlineExceeded`) and its running
//! pods are deleted. `suspend` deletes the running pods and records `Suspended`. Status:
//! `active`, `ready`, `succeeded`, `failed`, `terminating`, `startTime`, `completionTime`,
//! `completedIndexes`, and the `SuccessCriteriaMet`/`Complete` or `FailureTarget`/`Failed`
//! conditions. `ttlSecondsAfterFinished` deletes a finished Job (with its pods) after that
//! long, as the TTL-after-finished controller does.
//!
//! Succeeded and failed pods are counted from the pods the Job still has (upstream tracks
//! them with a finalizer, which also counts pods deleted early).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus},
        core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    chrono::{DateTime, Utc},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PropagationPolicy},
};
use skiff_apimachinery::{
    events::{Kind, Recorder},
    pod::{self as podfacts, controller_ref},
};

use crate::{
    Key,
    informer::{Change, Informer},
    owners,
    queue::Queue,
    replicaset::pod_from_template,
};

/// The annotation and label carrying an Indexed Job pod's index.
pub const INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// First delay before replacing a failed pod.
const BACKOFF: Duration = Duration::from_secs(10);
/// Longest delay before replacing a failed pod.
const MAX_BACKOFF: Duration = Duration::from_secs(360);

struct Ctx {
    client: Client,
    jobs: Arc<Informer<Job>>,
    pods: Arc<Informer<Pod>>,
    events: Recorder,
}

fn condition<'a>(s: &'a JobStatus, type_: &str) -> Option<&'a JobCondition> {
    s.conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// Whether the Job has finished (Complete or Failed), and when.
pub fn finished(job: &Job) -> Option<DateTime<Utc>> {
    let s = job.status.as_ref()?;
    condition(s, "Complete")
        .or_else(|| condition(s, "Failed"))
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map_or_else(Utc::now, |t| t.0)
        })
}

fn set_condition(
    s: &mut JobStatus,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) {
    let conds = s.conditions.get_or_insert_with(Vec::new);
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status || c.reason.as_deref() != Some(reason) {
            if c.status != status {
                c.last_transition_time = Some(Time(now));
            }
            c.status = status.into();
            c.reason = Some(reason.into());
            c.message = Some(message.into());
            c.last_probe_time = Some(Time(now));
        }
        return;
    }
    conds.push(JobCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    });
}

/// `0-2,4,6-7` for a set of indexes.
pub fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

fn index_of(p: &Pod) -> Option<i32> {
    p.annotations().get(INDEX).and_then(|v| v.parse().ok())
}

/// When the most recent failure ended.
fn last_failure(pods: &[Arc<Pod>]) -> Option<DateTime<Utc>> {
    pods.iter()
        .filter(|p| podfacts::phase(p) == "Failed")
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .filter_map(|c| {
                    c.state
                        .as_ref()?
                        .terminated
                        .as_ref()?
                        .finished_at
                        .as_ref()
                        .map(|t| t.0)
                })
                .max()
        })
        .max()
}

/// What a pass decided, as a plan the caller carries out (pure, for tests).
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New pods to create: their index (Indexed) or `None`.
    pub create: Vec<Option<i32>>,
    /// Running pods to delete (names).
    pub delete: Vec<String>,
    /// The status to write.
    pub status: JobStatus,
    /// When to look again.
    pub again: Option<Duration>,
    /// Events to record: (kind is warning, reason, message).
    pub events: Vec<(bool, String, String)>,
}

/// Decides a pass over `job` with its pods at `now`.
pub fn plan(job: &Job, pods: &[Arc<Pod>], now: DateTime<Utc>) -> Plan {
    let spec = job.spec.clone().unwrap_or_default();
    let mut p = Plan {
        status: job.status.clone().unwrap_or_default(),
        ..Default::default()
    };
    let s = &mut p.status;
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let on_failure = spec
        .template
        .spec
        .as_ref()
        .and_then(|t| t.restart_policy.as_deref())
        == Some("OnFailure");
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|x| podfacts::is_active(x)).collect();
    let terminating = pods
        .iter()
        .filter(|x| podfacts::is_terminating(x) && !podfacts::is_terminal(x))
        .count();
    let succeeded: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|x| podfacts::phase(x) == "Succeeded")
        .collect();
    let failed = pods
        .iter()
        .filter(|x| podfacts::phase(x) == "Failed")
        .count();
    let restarts: i32 = if on_failure {
        active.iter().map(|x| podfacts::restarts(x)).sum()
    } else {
        0
    };
    let done_indexes: BTreeSet<i32> = succeeded
        .iter()
        .filter_map(|x| index_of(x))
        .filter(|i| completions.is_none_or(|c| *i < c))
        .collect();
    s.succeeded = Some(succeeded.len() as i32);
    s.failed = Some(failed as i32);
    s.active = Some(active.len() as i32);
    s.ready = Some(active.iter().filter(|x| podfacts::is_ready(x)).count() as i32);
    s.terminating = Some(terminating as i32);
    if indexed {
        s.completed_indexes = Some(format_indexes(&done_indexes));
    }
    let finished_already = condition(s, "Complete").is_some() || condition(s, "Failed").is_some();
    if finished_already {
        p.delete = active.iter().map(|x| x.name_any()).collect();
        return p;
    }
    // Suspended: nothing runs.
    if spec.suspend == Some(true) {
        p.delete = active.iter().map(|x| x.name_any()).collect();
        if condition(s, "Suspended").is_none() {
            set_condition(s, "Suspended", "True", "JobSuspended", "Job suspended", now);
            p.events
                .push((false, "Suspended".into(), "Job suspended".into()));
        }
        s.start_time = None;
        return p;
    }
    if condition(s, "Suspended").is_some() {
        set_condition(s, "Suspended", "False", "JobResumed", "Job resumed", now);
        p.events
            .push((false, "Resumed".into(), "Job resumed".into()));
    }
    let start = s.start_time.get_or_insert(Time(now)).clone();
    // Success.
    let complete = match (indexed, completions) {
        (true, Some(c)) => done_indexes.len() as i32 >= c,
        (false, Some(c)) => succeeded.len() as i32 >= c,
        (_, None) => !succeeded.is_empty() && active.is_empty(),
    };
    if complete {
        p.delete = active.iter().map(|x| x.name_any()).collect();
        set_condition(
            s,
            "SuccessCriteriaMet",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
            now,
        );
        set_condition(
            s,
            "Complete",
            "True",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
            now,
        );
        s.completion_time = Some(Time(now));
        p.events
            .push((false, "Completed".into(), "Job completed".into()));
        return p;
    }
    // Failure.
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let failure = if failed as i32 + restarts > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if spec
        .active_deadline_seconds
        .is_some_and(|d| now >= start.0 + k8s_openapi::chrono::Duration::seconds(d))
    {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    if let Some((reason, message)) = failure {
        p.delete = active.iter().map(|x| x.name_any()).collect();
        set_condition(s, "FailureTarget", "True", reason, message, now);
        set_condition(s, "Failed", "True", reason, message, now);
        p.events.push((true, reason.into(), message.into()));
        return p;
    }
    if let Some(d) = spec.active_deadline_seconds {
        let ends = start.0 + k8s_openapi::chrono::Duration::seconds(d);
        p.again = (ends - now)
            .to_std()
            .ok()
            .map(|d| d + Duration::from_millis(100));
    }
    // Replacements of failed pods wait out the backoff.
    if failed > 0
        && let Some(last) = last_failure(pods)
    {
        let delay = BACKOFF
            .saturating_mul(1 << (failed - 1).min(6) as u32)
            .min(MAX_BACKOFF);
        let ready_at = last + k8s_openapi::chrono::Duration::from_std(delay).unwrap_or_default();
        if now < ready_at {
            let wait = (ready_at - now).to_std().unwrap_or_default();
            p.again = Some(p.again.map_or(wait, |a| a.min(wait)));
            return p;
        }
    }
    // Scale to the parallelism the remaining work allows.
    if indexed {
        let c = completions.unwrap_or(0);
        let running: BTreeSet<i32> = active.iter().filter_map(|x| index_of(x)).collect();
        let mut want = parallelism.saturating_sub(active.len());
        for i in 0..c {
            if want == 0 {
                break;
            }
            if !done_indexes.contains(&i) && !running.contains(&i) {
                p.create.push(Some(i));
                want -= 1;
            }
        }
    } else {
        let wanted = match completions {
            Some(c) => ((c - succeeded.len() as i32).max(0) as usize).min(parallelism),
            // A work queue: once one succeeded, no new pods.
            None if succeeded.is_empty() => parallelism,
            None => 0,
        };
        if active.len() < wanted {
            p.create
                .extend(std::iter::repeat_n(None, wanted - active.len()));
        } else if active.len() > wanted {
            let mut extra: Vec<&&Arc<Pod>> = active.iter().collect();
            // Not ready first, newest first.
            extra.sort_by(|a, b| {
                podfacts::is_ready(a)
                    .cmp(&podfacts::is_ready(b))
                    .then_with(|| b.creation_timestamp().cmp(&a.creation_timestamp()))
            });
            p.delete = extra
                .iter()
                .take(active.len() - wanted)
                .map(|x| x.name_any())
                .collect();
        }
    }
    p
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(job) = ctx.jobs.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // Finished with a TTL: delete it (and its pods) when the time comes.
    if let (Some(at), Some(ttl)) = (
        finished(&job),
        job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished),
    ) {
        let due = at + k8s_openapi::chrono::Duration::seconds(ttl.into());
        let now = Utc::now();
        if now >= due {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match api.delete(&key.name, &dp).await {
                Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(None);
        }
    }
    let spec = job.spec.clone().unwrap_or_default();
    let selector = spec.selector.clone().unwrap_or_default();
    let candidates = ctx.pods.cache().list_namespace(&key.namespace);
    let pods = owners::claim(&ctx.client, ctx.pods.cache(), &*job, &selector, candidates).await?;
    let now = Utc::now();
    let plan = plan(&job, &pods, now);
    for pod in pods.iter().filter(|p| plan.delete.contains(&p.name_any())) {
        owners::delete_pod(&ctx.client, ctx.pods.cache(), &ctx.events, &*job, pod).await?;
    }
    let owner = owners::controller_reference(&*job);
    for index in &plan.create {
        let mut template = spec.template.clone();
        let generate = match index {
            Some(i) => {
                let meta = template.metadata.get_or_insert_with(Default::default);
                meta.annotations
                    .get_or_insert_with(Default::default)
                    .insert(INDEX.into(), i.to_string());
                meta.labels
                    .get_or_insert_with(Default::default)
                    .insert(INDEX.into(), i.to_string());
                if let Some(ps) = template.spec.as_mut() {
                    if ps.hostname.is_none() {
                        ps.hostname = Some(format!("{}-{i}", key.name));
                    }
                    for c in ps
                        .containers
                        .iter_mut()
                        .chain(ps.init_containers.iter_mut().flatten())
                    {
                        c.env.get_or_insert_with(Vec::new).push(EnvVar {
                            name: "JOB_COMPLETION_INDEX".into(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: format!("metadata.annotations['{INDEX}']"),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        });
                    }
                }
                format!("{}-{i}-", key.name)
            }
            None => format!("{}-", key.name),
        };
        let pod = pod_from_template(&template, owner.clone(), &key.namespace, generate);
        owners::create_pod(&ctx.client, ctx.pods.cache(), &ctx.events, &*job, &pod).await?;
    }
    let written = if job.status.as_ref() != Some(&plan.status) {
        let mut updated = (*job).clone();
        updated.status = Some(plan.status);
        owners::replace_status(&ctx.client, ctx.jobs.cache(), &updated).await?
    } else {
        (*job).clone()
    };
    // Only once the status that announces them is written (a failed write repeats the pass).
    for (warning, reason, message) in &plan.events {
        let kind = if *warning {
            Kind::Warning
        } else {
            Kind::Normal
        };
        ctx.events.object(&*job, kind, reason, message);
    }
    // A finished Job with a TTL is looked at again when it expires.
    let again = match (finished(&written), spec.ttl_seconds_after_finished) {
        (Some(at), Some(ttl)) => {
            let due = at + k8s_openapi::chrono::Duration::seconds(ttl.into());
            Some((due - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(100))
        }
        _ => plan.again,
    };
    Ok(again)
}

/// Runs the Job controller until the process ends.
pub async fn run(client: Client, jobs: Arc<Informer<Job>>, pods: Arc<Informer<Pod>>) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut job_changes = jobs.subscribe();
    let mut pod_changes = pods.subscribe();
    jobs.synced().await;
    pods.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "job-controller", None),
        client,
        jobs,
        pods,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = job_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = pod_changes.recv() => {
                    if let Some(k) = owners::owner_key(&**c.object(), "Job") {
                        q.add(k);
                    }
                    if let Change::Applied { old: Some(old), .. } = &*c
                        && let Some(r) = controller_ref(&old.metadata).filter(|r| r.kind == "Job")
                    {
                        q.add(Key::new(&old.namespace().unwrap_or_default(), &r.name));
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("job", 5, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(spec: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "default"},
            "spec": spec}))
        .unwrap()
    }

    fn pod(name: &str, phase: &str, index: Option<i32>) -> Arc<Pod> {
        let mut v = json!({"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": []}, "status": {"phase": phase}});
        if let Some(i) = index {
            v["metadata"]["annotations"] = json!({INDEX: i.to_string()});
        }
        if phase == "Failed" {
            v["status"]["containerStatuses"] = json!([{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "finishedAt": "2026-01-01T00:00:10Z"}}}]);
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn completions_with_parallelism() {
        let j = job(json!({"completions": 3, "parallelism": 2, "template": {}}));
        let now = at("2026-01-01T00:00:00Z");
        assert_eq!(plan(&j, &[], now).create.len(), 2);
        let running = [pod("a", "Running", None), pod("b", "Succeeded", None)];
        assert_eq!(
            plan(&j, &running, now).create.len(),
            1,
            "two left, one running"
        );
        let two_done = [
            pod("a", "Running", None),
            pod("b", "Succeeded", None),
            pod("c", "Succeeded", None),
        ];
        assert!(
            plan(&j, &two_done, now).create.is_empty(),
            "one left, one running"
        );
        let done = [
            pod("a", "Succeeded", None),
            pod("b", "Succeeded", None),
            pod("c", "Succeeded", None),
        ];
        let p = plan(&j, &done, now);
        assert!(condition(&p.status, "Complete").is_some());
        assert_eq!(p.status.succeeded, Some(3));
        assert!(p.status.completion_time.is_some());
    }

    #[test]
    fn failures_back_off_then_exceed_the_limit() {
        let j = job(json!({"completions": 1, "backoffLimit": 1, "template": {}}));
        let one = [pod("a", "Failed", None)];
        let p = plan(&j, &one, at("2026-01-01T00:00:12Z"));
        assert!(p.create.is_empty(), "within the 10 s backoff");
        assert_eq!(p.again, Some(Duration::from_secs(8)));
        let p = plan(&j, &one, at("2026-01-01T00:00:21Z"));
        assert_eq!(p.create.len(), 1);
        let two = [pod("a", "Failed", None), pod("b", "Failed", None)];
        let p = plan(&j, &two, at("2026-01-01T00:01:00Z"));
        let c = condition(&p.status, "Failed").expect("failed");
        assert_eq!(c.reason.as_deref(), Some("BackoffLimitExceeded"));
    }

    #[test]
    fn indexed_jobs_fill_missing_indexes() {
        let j = job(
            json!({"completions": 4, "parallelism": 2, "completionMode": "Indexed", "template": {}}),
        );
        let pods = [pod("a", "Succeeded", Some(0)), pod("b", "Running", Some(2))];
        let p = plan(&j, &pods, Utc::now());
        assert_eq!(p.create, [Some(1)]);
        assert_eq!(p.status.completed_indexes.as_deref(), Some("0"));
        let mut set = BTreeSet::from([0, 1, 2, 4, 6, 7]);
        assert_eq!(format_indexes(&set), "0-2,4,6-7");
        set.clear();
        assert_eq!(format_indexes(&set), "");
    }

    #[test]
    fn deadline_and_suspend() {
        let mut j = job(json!({"completions": 1, "activeDeadlineSeconds": 5, "template": {}}));
        j.status = Some(JobStatus {
            start_time: Some(Time(at("2026-01-01T00:00:00Z"))),
            ..Default::default()
        });
        let running = [pod("a", "Running", None)];
        let p = plan(&j, &running, at("2026-01-01T00:00:06Z"));
        assert_eq!(
            condition(&p.status, "Failed").unwrap().reason.as_deref(),
            Some("DeadlineExceeded")
        );
        assert_eq!(p.delete, ["a"]);
        let p = plan(&j, &running, at("2026-01-01T00:00:02Z"));
        assert!(
            p.again
                .is_some_and(|d| d > Duration::from_secs(2) && d < Duration::from_secs(4))
        );
        let s = job(json!({"completions": 1, "suspend": true, "template": {}}));
        let p = plan(&s, &running, Utc::now());
        assert_eq!(p.delete, ["a"]);
        assert!(condition(&p.status, "Suspended").is_some());
    }
}
