//! Model-based and concurrent tests of the webhook processor: random streams of events
//! (valid, invalid, duplicated, conflicting, reordered) against a tiny in-test model, and
//! racing deliveries whose answers must agree with what is stored.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use futures::future::join_all;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use termopar_chat::webhook::{
    writer::{self as store, Delivery},
    RawRecord,
};

use crate::harness::*;

#[derive(Debug, Clone)]
enum Ev {
    Open(Uuid, DateTime<Utc>),
    Message {
        id: Uuid,
        conv: Uuid,
        sent: bool,
        content: String,
        ts: DateTime<Utc>,
    },
    Close(Uuid, DateTime<Utc>),
    Garbage(Vec<u8>),
}

fn ts(t: &DateTime<Utc>) -> String {
    t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

impl Ev {
    fn body(&self) -> Vec<u8> {
        let v = match self {
            Ev::Open(id, t) => {
                json!({"type": "NEW_CONVERSATION", "timestamp": ts(t), "data": {"id": id}})
            }
            Ev::Close(id, t) => {
                json!({"type": "CLOSE_CONVERSATION", "timestamp": ts(t), "data": {"id": id}})
            }
            Ev::Message {
                id,
                conv,
                sent,
                content,
                ts: t,
            } => json!({"type": "NEW_MESSAGE", "timestamp": ts(t), "data": {
                "id": id, "direction": if *sent { "SENT" } else { "RECEIVED" }, "content": content, "conversation_id": conv}}),
            Ev::Garbage(b) => return b.clone(),
        };
        serde_json::to_vec(&v).unwrap()
    }
}

/// What the processor should hold: conversations (created, closed) and messages.
#[derive(Default)]
struct Model {
    conversations: HashMap<Uuid, (DateTime<Utc>, Option<DateTime<Utc>>)>,
    messages: HashMap<Uuid, (Uuid, bool, String, DateTime<Utc>)>,
}

impl Model {
    /// Applies an event; returns the expected status and code.
    fn apply(&mut self, ev: &Ev) -> (StatusCode, &'static str) {
        match ev {
            Ev::Garbage(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Ev::Open(id, t) => match self.conversations.get(id) {
                None => {
                    self.conversations.insert(*id, (*t, None));
                    (StatusCode::OK, "processed")
                }
                Some((created, _)) if created == t => (StatusCode::OK, "duplicate"),
                Some(_) => (StatusCode::CONFLICT, "conflict"),
            },
            Ev::Close(id, t) => match self.conversations.get_mut(id) {
                None => (StatusCode::NOT_FOUND, "conversation_not_found"),
                Some((_, closed @ None)) => {
                    *closed = Some(*t);
                    (StatusCode::OK, "processed")
                }
                Some(_) => (StatusCode::OK, "duplicate"),
            },
            Ev::Message {
                id,
                conv,
                sent,
                content,
                ts,
            } => {
                let Some((_, closed)) = self.conversations.get(conv) else {
                    return (StatusCode::NOT_FOUND, "conversation_not_found");
                };
                let tuple = (*conv, *sent, content.clone(), *ts);
                if let Some(existing) = self.messages.get(id) {
                    return if *existing == tuple {
                        (StatusCode::OK, "duplicate")
                    } else {
                        (StatusCode::CONFLICT, "conflict")
                    };
                }
                if closed.is_some_and(|c| *ts >= c) {
                    return (StatusCode::CONFLICT, "conversation_closed");
                }
                self.messages.insert(*id, tuple);
                (StatusCode::OK, "processed")
            }
        }
    }
}

fn code(body: &Value) -> &str {
    body.get("code")
        .or(body.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Random events over a few conversations: opens (sometimes conflicting), messages
/// (some reusing ids with other content, some after the close), closes, garbage.
fn stream(rng: &mut StdRng, conversations: usize, len: usize) -> Vec<Ev> {
    let base = Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
    let convs: Vec<Uuid> = (0..conversations).map(|_| Uuid::new_v4()).collect();
    let messages: Vec<Uuid> = (0..conversations * 4).map(|_| Uuid::new_v4()).collect();
    let mut events: Vec<Ev> = Vec::new();
    while events.len() < len {
        let c = convs[rng.gen_range(0..convs.len())];
        let t = base
            + Duration::seconds(rng.gen_range(0..600))
            + Duration::microseconds(rng.gen_range(0..1000));
        let ev = match rng.gen_range(0..100) {
            0..=14 => Ev::Open(c, if rng.gen_bool(0.8) { base } else { t }),
            15..=24 => Ev::Close(c, base + Duration::seconds(300 + rng.gen_range(0..2) * 60)),
            25..=89 => Ev::Message {
                id: messages[rng.gen_range(0..messages.len())],
                conv: c,
                sent: rng.gen_bool(0.5),
                content: ["oi", "tudo bem?", "sim", "obrigado"][rng.gen_range(0..4)].to_owned(),
                ts: t,
            },
            _ => Ev::Garbage(vec![b'{'; rng.gen_range(1..5)]),
        };
        events.push(ev.clone());
        // Redeliveries of the same event, later in the stream.
        if rng.gen_bool(0.2) {
            events.push(ev);
        }
    }
    events.shuffle(rng);
    events
}

/// A conversation's messages as read through GET: id → (content, direction).
fn stored_messages(conversation: &Value) -> BTreeMap<String, (String, String)> {
    conversation["messages"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                (
                    m["content"].as_str().unwrap().to_owned(),
                    m["direction"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

/// The final state, read back through GET, equals the model.
async fn assert_stored_as_modelled(app: &TestApp, model: &Model) {
    for (id, (created, closed)) in &model.conversations {
        let (status, c) = app.conversation(&id.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(c["state"], if closed.is_some() { "CLOSED" } else { "OPEN" });
        assert_eq!(
            c["created_at"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap(),
            *created
        );
        let got = stored_messages(&c);
        let want: BTreeMap<String, (String, String)> = model
            .messages
            .iter()
            .filter(|(_, (conv, ..))| conv == id)
            .map(|(mid, (_, sent, content, _))| {
                (
                    mid.to_string(),
                    (
                        content.clone(),
                        if *sent { "SENT" } else { "RECEIVED" }.to_owned(),
                    ),
                )
            })
            .collect();
        assert_eq!(got, want, "messages of {id}");
    }
}

#[tokio::test]
async fn a_batch_decides_what_applying_its_events_one_by_one_would() {
    // Each stream goes through the writer's group path: in chunks of the largest group
    // (one transaction each), so messages and the conversation events they depend on,
    // redeliveries and conflicting reuses of an id meet inside one group; then one group
    // of messages with distinct ids (the one-statement path): redeliveries, conflicts,
    // messages after a close, for an unknown conversation, and new ones.
    let app = TestApp::spawn().await;
    let mut expected_records: Vec<(i32, String)> = Vec::new();
    for seed in 10..14u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let events = stream(&mut rng, 4, 400);
        let mut seen = std::collections::HashSet::new();
        let mut messages: Vec<Ev> = events
            .iter()
            .filter(|e| matches!(e, Ev::Message { id, .. } if seen.insert(*id)))
            .cloned()
            .collect();
        let conversations: std::collections::BTreeSet<Uuid> = events
            .iter()
            .filter_map(|e| match e {
                Ev::Open(c, _) | Ev::Close(c, _) => Some(*c),
                _ => None,
            })
            .collect();
        let base = Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
        for (j, c) in conversations.iter().chain([&Uuid::new_v4()]).enumerate() {
            messages.push(Ev::Message {
                id: Uuid::new_v4(),
                conv: *c,
                sent: j % 2 == 0,
                content: "new".into(),
                ts: base + Duration::seconds(if j % 2 == 0 { 10 } else { 590 }),
            });
        }
        messages.shuffle(&mut rng);
        assert!(messages.len() <= store::MAX_BATCH);

        let mut model = Model::default();
        let groups: Vec<&[Ev]> = events
            .chunks(store::MAX_BATCH)
            .chain([messages.as_slice()])
            .collect();
        for (g, group) in groups.into_iter().enumerate() {
            let deliveries: Vec<Delivery> = group
                .iter()
                .map(|ev| {
                    let body = ev.body();
                    Delivery::new(
                        &RawRecord::new(&Default::default(), &body),
                        termopar_chat::webhook::parse(&body),
                    )
                })
                .collect();
            let mut conn = app.state.pg.acquire().await.unwrap();
            let answers = store::write_batch(&mut conn, &deliveries).await.unwrap();
            assert_eq!(answers.len(), group.len());
            for (k, answer) in answers.iter().enumerate() {
                let (status, code) = store::recorded(answer);
                let expected = model.apply(&group[k]);
                assert_eq!(
                    (status.as_u16(), code),
                    (expected.0.as_u16(), expected.1),
                    "seed {seed} group {g} event {k} {:?}",
                    group[k]
                );
                expected_records.push((i32::from(status.as_u16()), code.to_owned()));
            }
        }
        assert_stored_as_modelled(&app, &model).await;
    }
    // Every delivery was recorded raw with its group and its answer, and reaches MongoDB
    // once.
    let stored = raw_records(&app._mongo.database().await, expected_records.len()).await;
    let recorded: Vec<(i32, String)> = stored
        .iter()
        .map(|d| {
            (
                d.get_i32("status").unwrap(),
                d.get_str("code").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(recorded, expected_records);
}

#[tokio::test]
async fn random_event_streams_end_in_the_state_the_model_predicts() {
    let app = TestApp::spawn().await;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let events = stream(&mut rng, 5, 150);
        let mut model = Model::default();
        for (i, ev) in events.iter().enumerate() {
            let (status, body) = app.webhook_raw("/webhook/", ev.body(), &[]).await;
            let expected = model.apply(ev);
            assert!(
                status.as_u16() < 500,
                "seed {seed} event {i}: {status} {body}"
            );
            assert_eq!(
                (status, code(&body)),
                expected,
                "seed {seed} event {i} {ev:?}: {body}"
            );
        }
        // The final state, read back through GET, equals the model.
        assert_stored_as_modelled(&app, &model).await;
    }
}

#[tokio::test]
async fn racing_deliveries_never_fail_and_their_answers_match_what_is_stored() {
    let app = TestApp::spawn().await;
    let base = Utc.with_ymd_and_hms(2026, 4, 1, 8, 0, 0).unwrap();
    let convs: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let send_all = |events: Vec<Ev>| {
        let app = &app;
        async move {
            join_all(events.iter().map(|ev| async move {
                (
                    ev.clone(),
                    app.webhook_raw("/webhook/", ev.body(), &[]).await,
                )
            }))
            .await
        }
    };

    // Wave 1: every open twice at once.
    let opens: Vec<Ev> = convs
        .iter()
        .flat_map(|c| [Ev::Open(*c, base), Ev::Open(*c, base)])
        .collect();
    let answers = send_all(opens).await;
    for c in &convs {
        let mine: Vec<&str> = answers
            .iter()
            .filter(|(e, _)| matches!(e, Ev::Open(id, _) if id == c))
            .map(|(_, (_, b))| code(b))
            .collect();
        assert_eq!(
            mine.iter().filter(|c| **c == "processed").count(),
            1,
            "{mine:?}"
        );
        assert!(mine.iter().all(|c| *c == "processed" || *c == "duplicate"));
    }

    // Wave 2: messages, each twice at once, and some ids raced by a different message.
    let mut messages = Vec::new();
    for (i, c) in convs.iter().enumerate() {
        for j in 0..3 {
            let id = Uuid::new_v4();
            let ev = Ev::Message {
                id,
                conv: *c,
                sent: j % 2 == 0,
                content: format!("m{i}-{j}"),
                ts: base + Duration::seconds(j),
            };
            messages.push(ev.clone());
            messages.push(ev);
            if j == 0 {
                messages.push(Ev::Message {
                    id,
                    conv: *c,
                    sent: true,
                    content: "impostor".into(),
                    ts: base + Duration::seconds(j),
                });
            }
        }
    }
    let answers = send_all(messages).await;
    for (ev, (status, body)) in &answers {
        assert!(status.as_u16() < 500, "{ev:?}: {status} {body}");
    }
    let mut won: HashMap<Uuid, String> = HashMap::new();
    for (ev, (_, body)) in &answers {
        if let (Ev::Message { id, content, .. }, "processed") = (ev, code(body)) {
            assert!(
                won.insert(*id, content.clone()).is_none(),
                "message {id} processed twice"
            );
        }
    }
    assert_eq!(won.len(), convs.len() * 3);

    // Wave 3: closes racing late messages stamped after the close.
    let close_at = base + Duration::minutes(10);
    let mut wave = Vec::new();
    for c in &convs {
        wave.push(Ev::Close(*c, close_at));
        let racer = Ev::Message {
            id: Uuid::new_v4(),
            conv: *c,
            sent: false,
            content: "racing".into(),
            ts: close_at + Duration::seconds(1),
        };
        wave.push(racer);
    }
    wave.shuffle(&mut StdRng::seed_from_u64(9));
    let answers = send_all(wave).await;
    for (ev, (status, body)) in &answers {
        assert!(status.as_u16() < 500, "{ev:?}: {status} {body}");
    }

    // What was answered is what is stored: no half-written state.
    for c in &convs {
        let (_, conv) = app.conversation(&c.to_string()).await;
        assert_eq!(conv["state"], "CLOSED");
        let stored: HashMap<String, String> = stored_messages(&conv)
            .into_iter()
            .map(|(id, (content, _))| (id, content))
            .collect();
        for (id, content) in won.iter() {
            if stored.contains_key(&id.to_string()) {
                assert_eq!(&stored[&id.to_string()], content);
            }
        }
        for (ev, (status, body)) in &answers {
            if let Ev::Message { id, conv: of, .. } = ev {
                if of != c {
                    continue;
                }
                let present = stored.contains_key(&id.to_string());
                match code(body) {
                    "processed" => assert!(present, "answered processed but not stored"),
                    "conversation_closed" => assert!(!present, "refused but stored"),
                    other => panic!("unexpected answer {status} {other}"),
                }
            }
        }
        let wave2 = won
            .keys()
            .filter(|id| stored.contains_key(&id.to_string()))
            .count();
        assert_eq!(wave2, 3, "every wave-2 message of {c} is stored");
    }
}
