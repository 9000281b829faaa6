//! Several messages of one partition carried in one AMQP message (a *bundle*).
//!
//! The broker's cost is per AMQP message (routing, persisting, confirming, delivering,
//! acknowledging), not per byte: on the order saga it was the largest single consumer of CPU
//! after PostgreSQL. So `publish_batch` packs the messages of one batch that go to one
//! partition queue into bundles, in their order, and the consumer unpacks them into ordinary
//! [`Delivery`](super::Delivery)s. Nothing above the transport sees a bundle: every message keeps
//! its id and key, is acknowledged, returned or dead-lettered on its own, and is deduplicated by
//! the receiver as before. The broker's message is acknowledged once all its parts are settled,
//! and returned (all of it) if any part was returned.
//!
//! The encoding is versioned and bounded: `SFB1`, a u32 part count, then for each part a u16 id
//! length, the id, a u16 key length, the key, a u32 payload length and the payload (big-endian).
//! [`decode`] checks every length against what is left and refuses trailing bytes, so a
//! corrupted or foreign body is an error (the consumer dead-letters it whole), never a panic.

use super::Message;

const MAGIC: &[u8; 4] = b"SFB1";

/// Whether `message` can go into a bundle (its id and key fit the u16 lengths).
pub fn fits(message: &Message) -> bool {
    message.id.len() <= usize::from(u16::MAX)
        && message.key.len() <= usize::from(u16::MAX)
        && u32::try_from(message.payload.len()).is_ok()
}

/// The encoded size of one part.
pub fn part_size(message: &Message) -> usize {
    2 + message.id.len() + 2 + message.key.len() + 4 + message.payload.len()
}

/// Encodes `parts` (each must [`fit`](fits)) in order.
pub fn encode<'a>(parts: impl IntoIterator<Item = &'a Message>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]);
    let mut n: u32 = 0;
    for m in parts {
        debug_assert!(fits(m), "a part too large for a bundle");
        out.extend_from_slice(&(m.id.len() as u16).to_be_bytes());
        out.extend_from_slice(m.id.as_bytes());
        out.extend_from_slice(&(m.key.len() as u16).to_be_bytes());
        out.extend_from_slice(m.key.as_bytes());
        out.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&m.payload);
        n += 1;
    }
    out[4..8].copy_from_slice(&n.to_be_bytes());
    out
}

/// Decodes a bundle into its parts, in order.
pub fn decode(body: &[u8]) -> Result<Vec<Message>, String> {
    let mut r = Reader { body, at: 0 };
    if r.take(4)? != MAGIC {
        return Err("not a sagaflow bundle (bad magic bytes)".into());
    }
    let n = r.u32()? as usize;
    // Each part takes at least 8 bytes: a count larger than the body allows is corrupt, and
    // checking it first keeps a forged count from reserving memory.
    if n == 0 || n > (body.len() - r.at) / 8 {
        return Err(format!(
            "bundle part count {n} does not fit its {} bytes",
            body.len()
        ));
    }
    let mut parts = Vec::with_capacity(n);
    for i in 0..n {
        let part = |e: String| format!("bundle part {}: {e}", i + 1);
        let id_len = usize::from(r.u16().map_err(part)?);
        let id = r.text(id_len, "id").map_err(part)?;
        let key_len = usize::from(r.u16().map_err(part)?);
        let key = r.text(key_len, "key").map_err(part)?;
        let payload_len = r.u32().map_err(part)? as usize;
        let payload = r.take(payload_len).map_err(part)?.to_vec();
        parts.push(Message { id, key, payload });
    }
    if r.at != body.len() {
        return Err(format!(
            "{} bytes after the last of {n} bundle parts",
            body.len() - r.at
        ));
    }
    Ok(parts)
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.body.len())
            .ok_or_else(|| {
                format!(
                    "truncated: {n} bytes wanted at offset {}, {} left",
                    self.at,
                    self.body.len() - self.at
                )
            })?;
        let s = &self.body[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn text(&mut self, n: usize, what: &str) -> Result<String, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(id: &str, key: &str, payload: &[u8]) -> Message {
        Message {
            id: id.into(),
            key: key.into(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn parts_come_back_in_order() {
        let parts = vec![
            m("s1/0/forward/1", "order-1", br#"{"a":1}"#),
            m("s2/0/forward/1", "order-2", b""),
            m("s1/1/forward/1", "order-1", "ü".as_bytes()),
        ];
        let body = encode(&parts);
        assert_eq!(
            body.len(),
            8 + parts.iter().map(part_size).sum::<usize>(),
            "part_size is what encode writes"
        );
        assert_eq!(decode(&body).unwrap(), parts);
    }

    #[test]
    fn corrupt_bodies_are_refused_with_a_reason() {
        let body = encode(&[m("a", "k", b"xyz"), m("b", "k", b"")]);
        assert!(decode(b"").unwrap_err().contains("truncated"));
        assert!(decode(b"{\"saga\":1}").unwrap_err().contains("magic"));
        let cut = decode(&body[..body.len() - 1]).unwrap_err();
        assert!(cut.contains("part 2") && cut.contains("truncated"), "{cut}");
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode(&extra).unwrap_err().contains("after the last"));
        let mut forged = body.clone();
        forged[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&forged).unwrap_err().contains("does not fit"));
        let mut empty = encode(&[]);
        assert!(decode(&empty).unwrap_err().contains("count 0"));
        empty.extend_from_slice(&[0; 8]);
        assert!(decode(&empty).is_err());
        let mut bad_utf8 = encode(&[m("é", "k", b"")]);
        bad_utf8[10] = 0xff;
        assert!(decode(&bad_utf8).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn oversized_ids_do_not_fit() {
        assert!(fits(&m("id", "key", b"p")));
        assert!(!fits(&m(&"x".repeat(70_000), "key", b"p")));
        assert!(!fits(&m("id", &"k".repeat(70_000), b"p")));
    }

    proptest! {
        #[test]
        fn any_parts_round_trip(parts in prop::collection::vec(
            (".{0,40}", ".{0,20}", prop::collection::vec(any::<u8>(), 0..200)), 1..20)
        ) {
            let parts: Vec<Message> = parts
                .into_iter()
                .map(|(id, key, payload)| Message { id, key, payload })
                .collect();
            prop_assert_eq!(decode(&encode(&parts)).unwrap(), parts);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&body);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&body);
            let _ = decode(&with_magic);
        }
    }
}
