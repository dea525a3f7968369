//! The wire format against its contract: every JSON example in `docs/protocol.md` must decode into
//! these types and encode back to exactly the same JSON, and decoding never panics.

use super::*;
use proptest::prelude::*;

const PROTOCOL_MD: &str = include_str!("../../../docs/protocol.md");

fn json_examples() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in PROTOCOL_MD.lines() {
        match (&mut cur, line.trim()) {
            (None, "```json") => cur = Some(String::new()),
            (Some(buf), "```") => {
                out.push(std::mem::take(buf));
                cur = None;
            }
            (Some(buf), _) => buf.push_str(line),
            (None, _) => {}
        }
    }
    out
}

fn same_json(a: &str, b: &str) -> bool {
    let a: serde_json::Value = serde_json::from_str(a).expect("valid json");
    let b: serde_json::Value = serde_json::from_str(b).expect("valid json");
    a == b
}

#[test]
fn every_example_in_the_protocol_document_round_trips() {
    let examples = json_examples();
    assert!(
        examples.len() >= 12,
        "found only {} examples",
        examples.len()
    );
    for ex in examples {
        let as_client = ClientFrame::decode(&ex)
            .ok()
            .map(|f| serde_json::to_string(&f).expect("encode"));
        let as_server = serde_json::from_str::<ServerFrame>(&ex)
            .ok()
            .map(|f| f.encode());
        let ok = as_client
            .iter()
            .chain(as_server.iter())
            .any(|enc| same_json(enc, &ex));
        assert!(
            ok,
            "example does not round-trip through the wire types:\n{ex}"
        );
    }
}

#[test]
fn server_frames_encode_as_documented() {
    let ack = ServerFrame::Ack {
        client_id: "c1".into(),
        conversation_id: "k1".into(),
        seq: 3,
        message_id: "m1".into(),
        created_at: 1,
        duplicate: false,
    };
    insta::assert_snapshot!(ack.encode(), @r#"{"type":"ack","client_id":"c1","conversation_id":"k1","seq":3,"message_id":"m1","created_at":1,"duplicate":false}"#);
    let err = ServerFrame::Error(
        ErrorFrame::new(ErrorCode::RateLimited, "slow down")
            .client_id("c1")
            .retry_after_ms(250),
    );
    insta::assert_snapshot!(err.encode(), @r#"{"type":"error","code":"rate_limited","message":"slow down","client_id":"c1","retry_after_ms":250}"#);
    let msg = ServerFrame::Message(MessageBody {
        conversation_id: "k1".into(),
        seq: 1,
        id: "m1".into(),
        author: Author::Agent {
            id: "a1".into(),
            name: "Ada".into(),
        },
        text: "hi".into(),
        created_at: 5,
        client_id: None,
    });
    insta::assert_snapshot!(msg.encode(), @r#"{"type":"message","conversation_id":"k1","seq":1,"id":"m1","author":{"kind":"agent","id":"a1","name":"Ada"},"text":"hi","created_at":5,"client_id":null}"#);
    insta::assert_snapshot!(ServerFrame::Ready.encode(), @r#"{"type":"ready"}"#);
    let rc = ServerFrame::Reconnect {
        reason: ReconnectReason::Draining,
        after_ms: 10,
    };
    insta::assert_snapshot!(rc.encode(), @r#"{"type":"reconnect","reason":"draining","after_ms":10}"#);
}

#[test]
fn error_codes_serialise_to_their_stable_names() {
    for code in [
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::HelloRequired,
        ErrorCode::AlreadyHello,
        ErrorCode::Unauthorized,
        ErrorCode::TextEmpty,
        ErrorCode::TextTooLong,
        ErrorCode::InvalidClientId,
        ErrorCode::NotFound,
        ErrorCode::ConversationClosed,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::BadRequest,
        ErrorCode::HistoryUnavailable,
        ErrorCode::SeqAhead,
        ErrorCode::Internal,
    ] {
        let json = serde_json::to_string(&code).expect("encode");
        assert_eq!(json, format!("\"{}\"", code.as_str()));
        assert!(
            PROTOCOL_MD.contains(&format!("`{}`", code.as_str())),
            "{} undocumented",
            code.as_str()
        );
    }
}

#[test]
fn decode_tells_unknown_types_from_malformed_frames() {
    assert_eq!(
        ClientFrame::decode(r#"{"type":"ping"}"#),
        Ok(ClientFrame::Ping)
    );
    assert!(
        matches!(ClientFrame::decode(r#"{"type":"teleport"}"#), Err(DecodeError::UnknownType(t)) if t == "teleport")
    );
    for bad in [
        "",
        "null",
        "[]",
        "{",
        r#"{"type":42}"#,
        r#"{"no_type":1}"#,
        r#"{"type":"send"}"#,
        r#"{"type":"send","client_id":"x","text":7}"#,
        r#"{"type":"hello","resume":[{"conversation_id":"k","seq":-1}]}"#,
    ] {
        assert!(
            matches!(ClientFrame::decode(bad), Err(DecodeError::BadFrame(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let f = ClientFrame::decode(r#"{"type":"send","client_id":"c","text":"t","future":true}"#);
    assert!(matches!(f, Ok(ClientFrame::Send { .. })));
}

fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
    let s = "[a-z0-9-]{0,12}";
    prop_oneof![
        (
            proptest::option::of(s),
            proptest::collection::vec((s, any::<u64>()), 0..4)
        )
            .prop_map(|(token, r)| ClientFrame::Hello {
                token,
                resume: r
                    .into_iter()
                    .map(|(c, seq)| ResumePoint {
                        conversation_id: c,
                        seq
                    })
                    .collect(),
                page: None,
                presence: Vec::new(),
            }),
        (s, proptest::option::of(s), any::<String>()).prop_map(
            |(client_id, conversation_id, text)| {
                ClientFrame::Send {
                    client_id,
                    conversation_id,
                    text,
                }
            }
        ),
        (
            s,
            s,
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(req_id, conversation_id, before_seq, after_seq, limit)| {
                ClientFrame::History {
                    req_id,
                    conversation_id,
                    before_seq,
                    after_seq,
                    limit,
                }
            }),
        Just(ClientFrame::Ping),
        Just(ClientFrame::Pong),
    ]
}

proptest! {
    #[test]
    fn client_frames_round_trip(frame in arb_client_frame()) {
        let text = serde_json::to_string(&frame).expect("encode");
        prop_assert_eq!(ClientFrame::decode(&text), Ok(frame));
    }

    #[test]
    fn decoding_arbitrary_text_never_panics(text in any::<String>()) {
        let _ = ClientFrame::decode(&text);
    }

    #[test]
    fn decoding_mangled_frames_never_panics(cut in 0usize..80, junk in "[{}\\[\\]\",:a-z0-9]{0,8}") {
        let base = r#"{"type":"send","client_id":"c","conversation_id":"k","text":"hello"}"#;
        let cut = cut.min(base.len());
        let text = format!("{}{}", &base[..cut], junk);
        let _ = ClientFrame::decode(&text);
    }
}
