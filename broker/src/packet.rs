//! Just enough MQTT (3.1, 3.1.1 and 5) for the front: framing, the CONNECT packet, the
//! topic of a PUBLISH, the filters of a SUBSCRIBE and the codes of a SUBACK, and the few
//! answers the front gives itself. Everything else passes through as bytes.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) const CONNECT: u8 = 1;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const PINGRESP: u8 = 13;

/// MQTT 5 reason code "Not authorized" (PUBACK, PUBREC, SUBACK, CONNACK, DISCONNECT).
pub(crate) const V5_NOT_AUTHORIZED: u8 = 0x87;
/// MQTT 5 CONNACK "Bad User Name or Password".
pub(crate) const V5_BAD_CREDENTIALS: u8 = 0x86;
/// MQTT 3.1.1 SUBACK "Failure".
pub(crate) const V4_SUBSCRIBE_FAILURE: u8 = 0x80;
/// MQTT 3.1.1 CONNACK "Connection Refused, bad user name or password".
pub(crate) const V4_BAD_CREDENTIALS: u8 = 0x04;
/// MQTT 3.1.1 CONNACK "Connection Refused, not authorized".
pub(crate) const V4_NOT_AUTHORIZED: u8 = 0x05;
/// MQTT 3.1.1 CONNACK "Connection Refused, unacceptable protocol version".
pub(crate) const V4_UNSUPPORTED_VERSION: u8 = 0x01;

/// PINGREQ, sent by the front on behalf of clients that asked for no keepalive.
pub(crate) const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// A packet the front cannot read: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed MQTT packet: {0}")]
pub(crate) struct Malformed(pub &'static str);

/// The packet type (upper four bits of the first byte).
pub(crate) fn kind(packet: &[u8]) -> u8 {
    packet[0] >> 4
}

/// Length of the fixed header and of the whole first packet in `buf`, once `buf` holds
/// enough to tell; `None` when more bytes are needed.
fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, Malformed> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 2 + i;
            if remaining > max {
                return Err(Malformed("packet larger than allowed"));
            }
            return Ok(Some((header, header + remaining)));
        }
    }
    Err(Malformed("remaining length longer than four bytes"))
}

/// Reads a stream packet by packet, holding a small buffer that grows only as far as
/// the largest packet needs.
pub(crate) struct PacketReader {
    buf: BytesMut,
    max: usize,
    /// Bytes the next read may fill: doubled while reads fill it, up to 64 KiB. Small at
    /// first: thousands of devices sending a reading now and then each hold one.
    chunk: usize,
}

impl PacketReader {
    pub(crate) fn new(max_packet: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max: max_packet,
            chunk: 256,
        }
    }

    /// Reads what the stream has; `false` at its end. Cancel safe.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> std::io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < self.chunk / 2 {
            self.buf.reserve(self.chunk);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = stream.read_buf(&mut self.buf).await?;
        if n == spare && self.chunk < 64 * 1024 {
            self.chunk *= 2;
        }
        Ok(n > 0)
    }

    /// The next complete packet already read.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, Malformed> {
        match frame(&self.buf, self.max)? {
            Some((_, total)) if self.buf.len() >= total => {
                Ok(Some(self.buf.split_to(total).freeze()))
            }
            Some((_, total)) => {
                // Room for the rest of this packet at once.
                self.buf.reserve(total - self.buf.len());
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Bytes read past the packets taken so far.
    pub(crate) fn take_rest(&mut self) -> BytesMut {
        self.buf.split()
    }
}

/// Reads a packet body field by field.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Malformed("packet shorter than its fields"))?;
        let slice = &self.buf[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A length-prefixed string or binary field, without its prefix.
    fn field(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u16()? as usize;
        self.take(len)
    }
    /// MQTT 5 properties, with their length prefix.
    fn properties(&mut self) -> Result<&'a [u8], Malformed> {
        let start = self.at;
        let mut len = 0usize;
        for i in 0..4 {
            let byte = self.u8()?;
            len |= ((byte & 0x7F) as usize) << (7 * i);
            if byte & 0x80 == 0 {
                self.take(len)?;
                return Ok(&self.buf[start..self.at]);
            }
        }
        Err(Malformed("property length longer than four bytes"))
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.at..]
    }
}

fn body(packet: &[u8]) -> Result<&[u8], Malformed> {
    let (header, _) = frame(packet, usize::MAX)?.ok_or(Malformed("truncated header"))?;
    Ok(&packet[header..])
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_field(out: &mut BytesMut, field: &[u8]) {
    out.put_u16(field.len() as u16);
    out.put_slice(field);
}

fn packet(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(first);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

/// A CONNECT packet, read as far as the front needs and kept whole for rewriting.
#[derive(Debug)]
pub(crate) struct Connect<'a> {
    /// Protocol level: 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub level: u8,
    pub keep_alive: u16,
    pub username: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
    /// The will's topic, when there is a will.
    pub will_topic: Option<&'a [u8]>,
    /// Protocol name with its length prefix.
    protocol: &'a [u8],
    flags: u8,
    /// MQTT 5 properties with their length (empty before 5).
    properties: &'a [u8],
    /// The client id, without its length.
    pub client_id: &'a [u8],
    /// The will (MQTT 5 will properties, topic, payload), as sent.
    will: &'a [u8],
}

impl<'a> Connect<'a> {
    pub(crate) fn parse(packet: &'a [u8]) -> Result<Self, Malformed> {
        let body = body(packet)?;
        let mut c = Cursor { buf: body, at: 0 };
        let start = c.at;
        c.field()?;
        let protocol = &body[start..c.at];
        let level = c.u8()?;
        let flags = c.u8()?;
        let keep_alive = c.u16()?;
        let v5 = level == 5;
        let properties = if v5 { c.properties()? } else { &[] };
        let client_id = c.field()?;
        let will_start = c.at;
        let will_topic = if flags & 0x04 != 0 {
            if v5 {
                c.properties()?;
            }
            let topic = c.field()?;
            c.field()?; // will payload
            Some(topic)
        } else {
            None
        };
        let will = &body[will_start..c.at];
        let username = if flags & 0x80 != 0 {
            Some(c.field()?)
        } else {
            None
        };
        let password = if flags & 0x40 != 0 {
            Some(c.field()?)
        } else {
            None
        };
        Ok(Self {
            level,
            keep_alive,
            username,
            password,
            will_topic,
            protocol,
            flags,
            properties,
            client_id,
            will,
        })
    }

    /// The same CONNECT with another keepalive and credentials, and the client id under
    /// `client_prefix` (a non-empty one).
    pub(crate) fn rewrite(
        &self,
        keep_alive: u16,
        client_prefix: &[u8],
        username: &[u8],
        password: &[u8],
    ) -> Bytes {
        let mut body = BytesMut::with_capacity(
            self.protocol.len() + self.properties.len() + self.will.len() + 128,
        );
        body.put_slice(self.protocol);
        body.put_u8(self.level);
        body.put_u8(self.flags | 0xC0);
        body.put_u16(keep_alive);
        body.put_slice(self.properties);
        if self.client_id.is_empty() {
            put_field(&mut body, b"");
        } else {
            body.put_u16((client_prefix.len() + self.client_id.len()) as u16);
            body.put_slice(client_prefix);
            body.put_slice(self.client_id);
        }
        body.put_slice(self.will);
        put_field(&mut body, username);
        put_field(&mut body, password);
        packet(0x10, &body)
    }
}

/// What the front reads of a PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Publish<'a> {
    /// Empty when an MQTT 5 client names the topic by `alias` alone.
    pub topic: &'a [u8],
    pub qos: u8,
    /// Present for QoS 1 and 2.
    pub packet_id: Option<u16>,
    /// MQTT 5's topic alias property.
    pub alias: Option<u16>,
    pub payload: &'a [u8],
}

/// MQTT 5's topic alias property.
const TOPIC_ALIAS: u8 = 0x23;

impl<'a> Publish<'a> {
    /// A PUBLISH of a connection at protocol `level`.
    pub(crate) fn parse(packet: &'a [u8], level: u8) -> Result<Self, Malformed> {
        let qos = (packet[0] >> 1) & 0x03;
        if qos == 3 {
            return Err(Malformed("PUBLISH with QoS 3"));
        }
        let mut c = Cursor {
            buf: body(packet)?,
            at: 0,
        };
        let topic = c.field()?;
        let packet_id = if qos > 0 { Some(c.u16()?) } else { None };
        let alias = if level == 5 {
            topic_alias(c.properties()?)?
        } else {
            None
        };
        Ok(Self {
            topic,
            qos,
            packet_id,
            alias,
            payload: c.rest(),
        })
    }
}

/// The topic alias among MQTT 5 `properties` (length prefix included).
fn topic_alias(properties: &[u8]) -> Result<Option<u16>, Malformed> {
    let mut c = Cursor {
        buf: properties,
        at: 0,
    };
    // Past the length prefix.
    while c.u8()? & 0x80 != 0 {}
    while !c.rest().is_empty() {
        let id = c.u8()?;
        match id {
            TOPIC_ALIAS => return Ok(Some(c.u16()?)),
            // Byte properties.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                c.u8()?;
            }
            // Two-byte integers.
            0x13 | 0x21 | 0x22 => {
                c.u16()?;
            }
            // Four-byte integers.
            0x02 | 0x11 | 0x18 | 0x27 => {
                c.take(4)?;
            }
            // Variable byte integer (subscription identifier).
            0x0B => while c.u8()? & 0x80 != 0 {},
            // Strings and binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                c.field()?;
            }
            // A string pair (user property).
            0x26 => {
                c.field()?;
                c.field()?;
            }
            _ => return Err(Malformed("unknown MQTT 5 property")),
        }
    }
    Ok(None)
}

/// A SUBSCRIBE: its id, MQTT 5 properties and filters with their options.
#[derive(Debug)]
pub(crate) struct Subscribe<'a> {
    pub packet_id: u16,
    properties: &'a [u8],
    pub filters: Vec<(&'a [u8], u8)>,
}

impl<'a> Subscribe<'a> {
    pub(crate) fn parse(packet: &'a [u8], level: u8) -> Result<Self, Malformed> {
        let mut c = Cursor {
            buf: body(packet)?,
            at: 0,
        };
        let packet_id = c.u16()?;
        let properties = if level == 5 { c.properties()? } else { &[] };
        let mut filters = Vec::new();
        while !c.rest().is_empty() {
            let filter = c.field()?;
            filters.push((filter, c.u8()?));
        }
        if filters.is_empty() {
            return Err(Malformed("SUBSCRIBE without filters"));
        }
        Ok(Self {
            packet_id,
            properties,
            filters,
        })
    }

    /// The same SUBSCRIBE with only the filters `keep` says.
    pub(crate) fn only(&self, keep: &[bool]) -> Bytes {
        let mut body = BytesMut::new();
        body.put_u16(self.packet_id);
        body.put_slice(self.properties);
        for ((filter, options), keep) in self.filters.iter().zip(keep) {
            if *keep {
                put_field(&mut body, filter);
                body.put_u8(*options);
            }
        }
        packet(0x82, &body)
    }
}

/// The packet id of a SUBACK (or of any packet whose body starts with one).
pub(crate) fn packet_id(packet: &[u8]) -> Result<u16, Malformed> {
    Cursor {
        buf: body(packet)?,
        at: 0,
    }
    .u16()
}

/// A SUBACK from the broker for the filters it was given, with the refused ones put
/// back in their places (`refused[i]` is `Some(code)` for a filter the front refused).
pub(crate) fn merge_suback(
    suback: &[u8],
    level: u8,
    refused: &[Option<u8>],
) -> Result<Bytes, Malformed> {
    let mut c = Cursor {
        buf: body(suback)?,
        at: 0,
    };
    let packet_id = c.u16()?;
    let properties = if level == 5 { c.properties()? } else { &[] };
    let mut granted = c.rest().iter();
    let mut body = BytesMut::new();
    body.put_u16(packet_id);
    body.put_slice(properties);
    for code in refused {
        match code {
            Some(code) => body.put_u8(*code),
            None => body.put_u8(
                *granted
                    .next()
                    .ok_or(Malformed("SUBACK with fewer codes than filters"))?,
            ),
        }
    }
    Ok(packet(0x90, &body))
}

/// Our own SUBACK, when every filter is refused.
pub(crate) fn suback(level: u8, packet_id: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(packet_id);
    if level == 5 {
        body.put_u8(0);
    }
    body.put_slice(codes);
    packet(0x90, &body)
}

/// The code refusing a subscription.
pub(crate) fn subscribe_refused(level: u8) -> u8 {
    if level == 5 {
        V5_NOT_AUTHORIZED
    } else {
        V4_SUBSCRIBE_FAILURE
    }
}

/// PUBACK (`first` 0x40) or PUBREC (0x50) of a refused publish: MQTT 5 says "not
/// authorized"; MQTT 3.1.1 can only acknowledge positively (or close, [MQTT-3.3.5-2]).
pub(crate) fn publish_refused(first: u8, level: u8, packet_id: u16) -> Bytes {
    let id = packet_id.to_be_bytes();
    if level == 5 {
        packet(first, &[id[0], id[1], V5_NOT_AUTHORIZED])
    } else {
        packet(first, &id)
    }
}

/// PUBCOMP, ending the QoS 2 exchange of a refused 3.1.1 publish.
pub(crate) fn pubcomp(packet_id: u16) -> Bytes {
    packet(0x70, &packet_id.to_be_bytes())
}

/// A CONNACK refusing the connection.
pub(crate) fn connack_refused(level: u8, code: u8) -> Bytes {
    if level == 5 {
        packet(0x20, &[0, code, 0])
    } else {
        packet(0x20, &[0, code])
    }
}

/// MQTT 5 DISCONNECT from the server with a reason code and a reason string (which
/// some clients, paho among them, need in order to read the code at all).
pub(crate) fn disconnect(reason: u8, why: &str) -> Bytes {
    let mut property = BytesMut::new();
    property.put_u8(0x1F); // reason string
    put_field(&mut property, why.as_bytes());
    let mut body = BytesMut::new();
    body.put_u8(reason);
    put_varint(&mut body, property.len());
    body.put_slice(&property);
    packet(0xE0, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v(level: u8, keep_alive: u16, will: bool, creds: bool) -> Bytes {
        let mut body = BytesMut::new();
        put_field(&mut body, if level == 3 { b"MQIsdp" } else { b"MQTT" });
        body.put_u8(level);
        let mut flags = 0x02;
        if will {
            flags |= 0x04 | 0x08;
        }
        if creds {
            flags |= 0xC0;
        }
        body.put_u8(flags);
        body.put_u16(keep_alive);
        if level == 5 {
            body.put_slice(&[5, 0x11, 0, 0, 0, 10]); // session expiry 10
        }
        put_field(&mut body, b"client-1");
        if will {
            if level == 5 {
                body.put_u8(0);
            }
            put_field(&mut body, b"will/topic");
            put_field(&mut body, b"bye");
        }
        if creds {
            put_field(&mut body, b"user");
            put_field(&mut body, b"pass");
        }
        packet(0x10, &body)
    }

    #[test]
    fn connect_is_read_and_rewritten_with_every_field_kept() {
        for level in [3, 4, 5] {
            for will in [false, true] {
                for creds in [false, true] {
                    let original = connect_v(level, 0, will, creds);
                    let c = Connect::parse(&original).unwrap();
                    assert_eq!(c.level, level);
                    assert_eq!(c.keep_alive, 0);
                    assert_eq!(c.will_topic, will.then_some(&b"will/topic"[..]));
                    assert_eq!(c.username, creds.then_some(&b"user"[..]));
                    assert_eq!(c.password, creds.then_some(&b"pass"[..]));
                    let rewritten = c.rewrite(60, b"p/", b"front", b"token");
                    let r = Connect::parse(&rewritten).unwrap();
                    assert_eq!((r.level, r.keep_alive), (level, 60));
                    assert_eq!(r.will_topic, c.will_topic);
                    assert_eq!(
                        (r.username, r.password),
                        (Some(&b"front"[..]), Some(&b"token"[..]))
                    );
                    assert_eq!((r.properties, r.will), (c.properties, c.will));
                    assert_eq!(r.client_id, b"p/client-1");
                }
            }
        }
    }

    #[test]
    fn truncated_or_oversized_packets_are_refused() {
        let full = connect_v(4, 10, true, true);
        for cut in 2..full.len() {
            assert!(
                Connect::parse(&packet(0x10, &full[2..cut])).is_err(),
                "{cut}"
            );
        }
        assert_eq!(
            frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], usize::MAX),
            Err(Malformed("remaining length longer than four bytes"))
        );
        assert!(frame(&[0x30, 0x80, 0x01], 100).is_err());
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80, 0x01], 128), Ok(Some((3, 131))));
    }

    #[tokio::test]
    async fn packets_are_framed_across_reads_of_any_size() {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let p = packet(0x30, &vec![7u8; n]);
            stream.extend_from_slice(&p);
            expected.push(p);
        }
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in stream.chunks(333) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut reader = PacketReader::new(1 << 20);
        let mut got = Vec::new();
        while reader.fill(&mut rx).await.unwrap() {
            while let Some(p) = reader.next().unwrap() {
                got.push(p);
            }
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_subscribe_keeps_only_the_allowed_filters_and_its_suback_is_merged() {
        for level in [4, 5] {
            let mut body = BytesMut::new();
            body.put_u16(42);
            if level == 5 {
                body.put_u8(0);
            }
            for f in [&b"a/#"[..], b"b", b"c/+"] {
                put_field(&mut body, f);
                body.put_u8(1);
            }
            let sub = packet(0x82, &body);
            let s = Subscribe::parse(&sub, level).unwrap();
            assert_eq!(s.packet_id, 42);
            assert_eq!(s.filters.len(), 3);
            let only = s.only(&[false, true, false]);
            let o = Subscribe::parse(&only, level).unwrap();
            assert_eq!(o.filters, vec![(&b"b"[..], 1)]);
            let broker = suback(level, 42, &[1]);
            let merged = merge_suback(&broker, level, &[Some(0x87), None, Some(0x87)]).unwrap();
            assert_eq!(merged, suback(level, 42, &[0x87, 1, 0x87]));
        }
    }

    #[test]
    fn publish_topic_qos_id_and_payload_are_read() {
        let mut body = BytesMut::new();
        put_field(&mut body, b"x/y");
        body.put_u16(9);
        body.put_slice(b"payload");
        let p = packet(0x32, &body);
        assert_eq!(
            Publish::parse(&p, 4).unwrap(),
            Publish {
                topic: b"x/y",
                qos: 1,
                packet_id: Some(9),
                alias: None,
                payload: b"payload",
            }
        );
        assert!(Publish::parse(&packet(0x36, &body), 4).is_err());
    }

    #[test]
    fn an_mqtt5_publish_names_its_topic_alias_among_other_properties() {
        let mut body = BytesMut::new();
        put_field(&mut body, b"");
        body.put_u16(7);
        let mut properties = BytesMut::new();
        properties.put_u8(0x01); // payload format
        properties.put_u8(1);
        properties.put_u8(0x26); // a user property
        put_field(&mut properties, b"k");
        put_field(&mut properties, b"v");
        properties.put_u8(TOPIC_ALIAS);
        properties.put_u16(3);
        put_varint(&mut body, properties.len());
        body.put_slice(&properties);
        body.put_slice(b"{}");
        let whole = packet(0x32, &body);
        let p = Publish::parse(&whole, 5).unwrap();
        assert_eq!(
            (p.topic, p.alias, p.payload),
            (&b""[..], Some(3), &b"{}"[..])
        );

        let mut body = BytesMut::new();
        put_field(&mut body, b"a/b");
        body.put_u8(0); // QoS 0: no packet id; no properties
        body.put_slice(b"x");
        let whole = packet(0x30, &body);
        let p = Publish::parse(&whole, 5).unwrap();
        assert_eq!(
            (p.topic, p.alias, p.payload),
            (&b"a/b"[..], None, &b"x"[..])
        );
    }
}
