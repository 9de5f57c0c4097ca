//! MAC addresses as `aa:bb:cc:dd:ee:ff` in JSON and logs.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Error parsing a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (want six hex octets like 0a:58:0a:f4:00:05)")]
pub struct MacParseError(String);

impl FromStr for Mac {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Mac, MacParseError> {
        let err = || MacParseError(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(err)?;
            *octet = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(mac))
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = MacParseError;

    fn try_from(bytes: &[u8]) -> Result<Mac, MacParseError> {
        <[u8; 6]>::try_from(bytes)
            .map(Mac)
            .map_err(|_| MacParseError(format!("{bytes:02x?}")))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::Mac;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let mac: Mac = "0a:58:0A:f4:00:05".parse().unwrap();
        assert_eq!(mac.0, [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05]);
        assert_eq!(mac.to_string(), "0a:58:0a:f4:00:05");
        for bad in [
            "",
            "0a:58:0a:f4:00",
            "0a:58:0a:f4:00:05:06",
            "0a:58:0a:f4:00:zz",
            "a:58:0a:f4:00:05",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }
}
