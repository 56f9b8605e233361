//! The format of generated API keys: `tg_`, 43 base62 characters carrying 256 random bits,
//! then 6 base62 characters of CRC-32 over everything before them, e.g.
//! `tg_4fZq…Xw1a9Q` (52 characters). The checksum lets secret scanners recognise a real
//! key and lets the gateway reject a mistyped one without a lookup.
//!
//! Pure: the caller supplies the random bytes (the operator uses the OS generator).

/// Prefix of every generated key.
pub const PREFIX: &str = "tg_";
/// Base62 characters of randomness.
pub const BODY_LEN: usize = 43;
/// Base62 characters of checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Length of a generated key.
pub const KEY_LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Largest multiple of 62 that fits a byte: bytes at or above it are discarded so every
/// character is uniform.
const ACCEPT_BELOW: u8 = 248;

/// What a presented key looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A generated key with a valid checksum.
    Generated,
    /// Shaped like a generated key, but the checksum does not match: a typo or a
    /// truncated copy.
    BadChecksum,
    /// Any other key (written by hand for standalone use); only a lookup can tell.
    Other,
}

/// Builds a key from random bytes, taking only what it needs; `None` if `random` runs
/// out first (the operator passes 64 bytes per try and retries, see [`bytes_needed`]).
pub fn from_random(random: &[u8]) -> Option<String> {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    for &b in random {
        if key.len() == PREFIX.len() + BODY_LEN {
            break;
        }
        if b < ACCEPT_BELOW {
            key.push(ALPHABET[usize::from(b % 62)] as char);
        }
    }
    if key.len() < PREFIX.len() + BODY_LEN {
        return None;
    }
    let checksum = checksum(&key);
    key.push_str(&checksum);
    Some(key)
}

/// Random bytes to draw per attempt: with 3% of bytes discarded, 64 almost always
/// suffice for 43 characters.
pub const fn bytes_needed() -> usize {
    64
}

/// The checksum characters of `head` (prefix and body).
fn checksum(head: &str) -> String {
    let mut n = crc32fast::hash(head.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ASCII")
}

/// Classifies a presented key.
pub fn shape(key: &str) -> Shape {
    if key.len() != KEY_LEN
        || !key.starts_with(PREFIX)
        || !key[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
    {
        return Shape::Other;
    }
    let (head, sum) = key.split_at(KEY_LEN - CHECKSUM_LEN);
    if checksum(head) == sum {
        Shape::Generated
    } else {
        Shape::BadChecksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u8) -> String {
        let random: Vec<u8> = (0..64u32)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect();
        from_random(&random).unwrap()
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_verify() {
        let key = sample(1);
        assert_eq!(key.len(), KEY_LEN);
        assert!(key.starts_with("tg_"));
        assert!(key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(shape(&key), Shape::Generated);
        assert_ne!(sample(1), sample(2));
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let key = sample(3);
        for i in PREFIX.len()..KEY_LEN {
            for c in ALPHABET.iter().map(|b| *b as char) {
                if key.as_bytes()[i] as char == c {
                    continue;
                }
                let mut typo = key.clone();
                typo.replace_range(i..=i, &c.to_string());
                assert_eq!(shape(&typo), Shape::BadChecksum, "typo at {i}: {typo}");
            }
        }
        // Swapping two different adjacent characters is caught as well.
        let bytes = key.as_bytes();
        for i in PREFIX.len()..KEY_LEN - 1 {
            if bytes[i] != bytes[i + 1] {
                let mut swapped = bytes.to_vec();
                swapped.swap(i, i + 1);
                let swapped = String::from_utf8(swapped).unwrap();
                assert_eq!(shape(&swapped), Shape::BadChecksum);
            }
        }
    }

    #[test]
    fn other_keys_are_left_to_the_lookup() {
        for key in [
            "tg_localDevKeyForTheMockProviderOnly00000003",
            "sk-something",
            "",
            &sample(4)[..KEY_LEN - 1],
            &format!("{}!", &sample(4)[..KEY_LEN - 1]),
        ] {
            assert_eq!(shape(key), Shape::Other, "{key}");
        }
    }

    #[test]
    fn characters_are_uniform_and_short_input_is_refused() {
        // Bytes 248..=255 are skipped, so they never bias the alphabet.
        let skipped: Vec<u8> = (248..=255).chain(0..62).collect();
        let key = from_random(&skipped).unwrap();
        assert!(key[3..46].starts_with("0123456789ABC"));
        assert_eq!(from_random(&[0; 42]), None);
        assert_eq!(from_random(&[255; 64]), None);
    }
}
