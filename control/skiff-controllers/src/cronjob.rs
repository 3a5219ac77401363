//! The CronJob controller (`pkg/controller/cronjob`, v2): creates a Job from `jobTemplate` at
//! each time of `schedule` (standard five-field cron and the `@hourly`-style macros, in
//! `timeZone` or UTC), named `<cronjob>-<minutes since the epoch>` so a time is run once.
//! Missed times: only the latest is run, and not at all when older than
//! `startingDeadlineSeconds`. `concurrencyPolicy`: `Allow`, `Forbid` (skip while a Job runs)
//! or `Replace` (delete the running Jobs first). `suspend` stops new Jobs. Finished Jobs beyond
//! `successfulJobsHistoryLimit` and `failedJobsHistoryLimit` are deleted, oldest first. Status:
//! `active`, `lastScheduleTime`, `lastSuccessfulTime`. Schedules use the `croner` crate
//! (POSIX semantics: day-of-month and day-of-week restricted together match either).

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono_tz::Tz;
use croner::Cron;
use k8s_openapi::{
    api::batch::v1::{CronJob, CronJobStatus, Job},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    chrono::{DateTime, SecondsFormat, Utc},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams, PropagationPolicy},
};
use skiff_apimachinery::{
    events::{Kind, Recorder, reference},
    pod::controller_ref,
};

use crate::{Key, informer::Informer, owners, queue::Queue};

/// The annotation with the time a Job was scheduled for.
pub const SCHEDULED: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// Missed times beyond which a warning is recorded.
const TOO_MANY_MISSED: usize = 100;

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `schedule` (a `TZ=`/`CRON_TZ=` prefix is honoured) in `time_zone` (UTC if none).
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Schedule, String> {
        let (mut zone, mut expr) = (time_zone.map(str::to_string), schedule.trim());
        for prefix in ["CRON_TZ=", "TZ="] {
            if let Some(rest) = expr.strip_prefix(prefix) {
                let (z, e) = rest
                    .split_once(' ')
                    .ok_or("a time zone prefix needs a schedule after it")?;
                zone = Some(z.to_string());
                expr = e.trim();
            }
        }
        let expr = match expr {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            e => e,
        };
        if expr.split_whitespace().count() != 5 {
            return Err(format!(
                "expected exactly 5 fields, found {}: {expr}",
                expr.split_whitespace().count()
            ));
        }
        let cron = Cron::from_str(expr).map_err(|e| e.to_string())?;
        let tz = match zone.as_deref() {
            None | Some("") | Some("UTC") | Some("Etc/UTC") => Tz::UTC,
            Some(z) => Tz::from_str(z).map_err(|_| format!("unknown time zone {z}"))?,
        };
        Ok(Schedule { cron, tz })
    }

    /// The first time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest time in (`after`, `now`], and how many there were.
    pub fn most_recent(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (Option<DateTime<Utc>>, usize) {
        let (mut last, mut n) = (None, 0);
        let mut t = after;
        while let Some(next) = self.next_after(t) {
            if next > now {
                break;
            }
            last = Some(next);
            n += 1;
            t = next;
            if n > 100_000 {
                break;
            }
        }
        (last, n)
    }
}

struct Ctx {
    client: Client,
    cronjobs: Arc<Informer<CronJob>>,
    jobs: Arc<Informer<Job>>,
    events: Recorder,
}

fn job_finished(j: &Job) -> Option<(&'static str, DateTime<Utc>)> {
    let conds = j.status.as_ref()?.conditions.as_ref()?;
    for c in conds.iter().filter(|c| c.status == "True") {
        let at = c
            .last_transition_time
            .as_ref()
            .map_or_else(Utc::now, |t| t.0);
        match c.type_.as_str() {
            "Complete" => return Some(("Complete", at)),
            "Failed" => return Some(("Failed", at)),
            _ => {}
        }
    }
    None
}

/// The Job for the time `at`.
pub fn job_for(cj: &CronJob, at: DateTime<Utc>) -> Job {
    let spec = cj.spec.clone().unwrap_or_default();
    let tpl = spec.job_template;
    let meta = tpl.metadata.unwrap_or_default();
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(
        SCHEDULED.into(),
        at.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    Job {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", cj.name_any(), at.timestamp() / 60)),
            namespace: cj.namespace(),
            labels: meta.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![owners::controller_reference(cj)]),
            ..Default::default()
        },
        spec: tpl.spec,
        status: None,
    }
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(cj) = ctx.cronjobs.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    if cj.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let spec = cj.spec.clone().unwrap_or_default();
    let uid = cj.uid();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let mut children: Vec<Arc<Job>> = ctx
        .jobs
        .cache()
        .list_namespace(&key.namespace)
        .into_iter()
        .filter(|j| controller_ref(&j.metadata).is_some_and(|r| Some(&r.uid) == uid.as_ref()))
        .collect();
    children.sort_by_key(|j| j.creation_timestamp());
    let mut status = cj.status.clone().unwrap_or_default();
    let now = Utc::now();
    let active: Vec<&Arc<Job>> = children
        .iter()
        .filter(|j| job_finished(j).is_none() && j.metadata.deletion_timestamp.is_none())
        .collect();
    status.active = (!active.is_empty()).then(|| active.iter().map(|j| reference(&***j)).collect());
    if let Some(t) = children
        .iter()
        .filter_map(|j| {
            let (kind, _) = job_finished(j)?;
            (kind == "Complete")
                .then(|| j.status.as_ref()?.completion_time.clone())
                .flatten()
        })
        .map(|t| t.0)
        .max()
    {
        status.last_successful_time = Some(Time(t));
    }
    // History limits.
    for (kind, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let mut done: Vec<(DateTime<Utc>, &Arc<Job>)> = children
            .iter()
            .filter_map(|j| {
                job_finished(j)
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, at)| (at, j))
            })
            .filter(|(_, j)| j.metadata.deletion_timestamp.is_none())
            .collect();
        done.sort_by_key(|(at, j)| (*at, j.name_any()));
        let excess = done.len().saturating_sub(limit.max(0) as usize);
        for (_, j) in done.into_iter().take(excess) {
            delete_job(&ctx, &cj, &jobs_api, j).await?;
        }
    }
    let schedule = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            ctx.events.object(
                &*cj,
                Kind::Warning,
                "UnparseableSchedule",
                &format!("unparseable schedule: {:?} : {e}", spec.schedule),
            );
            write_status(&ctx, &cj, status).await?;
            return Ok(None);
        }
    };
    let next = schedule.next_after(now);
    let again = next.map(|n| (n - now).to_std().unwrap_or_default() + Duration::from_millis(100));
    if spec.suspend == Some(true) {
        write_status(&ctx, &cj, status).await?;
        return Ok(None);
    }
    let mut earliest = status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| cj.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    if let Some(d) = spec.starting_deadline_seconds {
        earliest = earliest.max(now - k8s_openapi::chrono::Duration::seconds(d));
    }
    let (due, missed) = schedule.most_recent(earliest, now);
    let Some(at) = due else {
        write_status(&ctx, &cj, status).await?;
        return Ok(again);
    };
    if missed > TOO_MANY_MISSED {
        ctx.events.object(&*cj, Kind::Warning, "TooManyMissedTimes", &format!("too many missed start times: {missed}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"));
    }
    if spec
        .starting_deadline_seconds
        .is_some_and(|d| at + k8s_openapi::chrono::Duration::seconds(d) < now)
    {
        ctx.events.object(
            &*cj,
            Kind::Warning,
            "MissSchedule",
            &format!(
                "Missed scheduled time to start a job: {}",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        );
        write_status(&ctx, &cj, status).await?;
        return Ok(again);
    }
    let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
    let name = format!("{}-{}", cj.name_any(), at.timestamp() / 60);
    let already = children.iter().any(|j| j.name_any() == name);
    if !already {
        if policy == "Forbid" && !active.is_empty() {
            tracing::debug!(cronjob = %key.name, "a Job is still running; skipping this time (Forbid)");
            write_status(&ctx, &cj, status).await?;
            return Ok(again);
        }
        if policy == "Replace" {
            for j in &active {
                delete_job(&ctx, &cj, &jobs_api, j).await?;
            }
            status.active = None;
        }
        match jobs_api
            .create(&PostParams::default(), &job_for(&cj, at))
            .await
        {
            Ok(j) => {
                ctx.events.object(
                    &*cj,
                    Kind::Normal,
                    "SuccessfulCreate",
                    &format!("Created job {}", j.name_any()),
                );
                status
                    .active
                    .get_or_insert_with(Vec::new)
                    .push(reference(&j));
                ctx.jobs.cache().observe(j);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                ctx.events.object(
                    &*cj,
                    Kind::Warning,
                    "FailedCreate",
                    &format!("Error creating job: {e}"),
                );
                return Err(e.into());
            }
        }
    }
    status.last_schedule_time = Some(Time(at));
    write_status(&ctx, &cj, status).await?;
    Ok(again)
}

async fn delete_job(ctx: &Ctx, cj: &CronJob, api: &Api<Job>, j: &Job) -> anyhow::Result<()> {
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(&j.name_any(), &dp).await {
        Ok(_) => {
            ctx.events.object(
                cj,
                Kind::Normal,
                "SuccessfulDelete",
                &format!("Deleted job {}", j.name_any()),
            );
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(ctx: &Ctx, cj: &CronJob, status: CronJobStatus) -> anyhow::Result<()> {
    if cj.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let mut updated = cj.clone();
    updated.status = Some(status);
    owners::replace_status(&ctx.client, ctx.cronjobs.cache(), &updated).await?;
    Ok(())
}

/// Runs the CronJob controller until the process ends.
pub async fn run(client: Client, cronjobs: Arc<Informer<CronJob>>, jobs: Arc<Informer<Job>>) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut cj_changes = cronjobs.subscribe();
    let mut job_changes = jobs.subscribe();
    cronjobs.synced().await;
    jobs.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "cronjob-controller", None),
        client,
        cronjobs,
        jobs,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = cj_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = job_changes.recv() => {
                    if let Some(k) = owners::owner_key(&**c.object(), "CronJob") {
                        q.add(k);
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("cronjob", 2, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn schedules_in_utc_and_in_a_time_zone() {
        let s = Schedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(
            s.next_after(at("2026-03-01T10:07:00Z")),
            Some(at("2026-03-01T10:15:00Z"))
        );
        let (last, n) = s.most_recent(at("2026-03-01T10:00:00Z"), at("2026-03-01T11:05:00Z"));
        assert_eq!((last, n), (Some(at("2026-03-01T11:00:00Z")), 4));
        // 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer.
        let ny = Schedule::parse("0 9 * * *", Some("America/New_York")).unwrap();
        assert_eq!(
            ny.next_after(at("2026-01-15T00:00:00Z")),
            Some(at("2026-01-15T14:00:00Z"))
        );
        assert_eq!(
            ny.next_after(at("2026-07-15T00:00:00Z")),
            Some(at("2026-07-15T13:00:00Z"))
        );
        let prefixed = Schedule::parse("CRON_TZ=Asia/Tokyo 0 0 * * *", None).unwrap();
        assert_eq!(
            prefixed.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T15:00:00Z"))
        );
        let hourly = Schedule::parse("@hourly", None).unwrap();
        assert_eq!(
            hourly.next_after(at("2026-01-01T00:30:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
        // Day of month and day of week together: either matches (Jan 13 2026 is a Tuesday).
        let either = Schedule::parse("0 0 13 * 5", None).unwrap();
        assert_eq!(
            either.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-13T00:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_and_zones_are_errors() {
        assert!(Schedule::parse("* * * *", None).is_err());
        assert!(Schedule::parse("61 * * * *", None).is_err());
        assert!(Schedule::parse("* * * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn jobs_are_named_by_their_minute() {
        let cj: CronJob = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "report", "namespace": "default", "uid": "u"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"metadata": {"labels": {"team": "a"}},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}}
        }))
        .unwrap();
        let j = job_for(&cj, at("2026-01-01T00:01:00Z"));
        assert_eq!(
            j.name_any(),
            format!("report-{}", at("2026-01-01T00:01:00Z").timestamp() / 60)
        );
        assert_eq!(j.labels().get("team").map(String::as_str), Some("a"));
        assert_eq!(
            j.annotations().get(SCHEDULED).map(String::as_str),
            Some("2026-01-01T00:01:00Z")
        );
    }
}
