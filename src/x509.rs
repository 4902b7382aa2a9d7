//! The one fact the proxy reads from its own certificate: when it expires
//! (for the `tls_certificate_expiry_timestamp_seconds` gauge, so an alert
//! can fire days ahead). rustls checks everything else; it does not expose
//! the validity, and a whole X.509 crate for one field would outweigh this
//! walk over the DER it already parsed once.
//!
//! Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
//! serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name,
//! validity SEQUENCE { notBefore Time, notAfter Time }, … }, … }
//! (RFC 5280 4.1), Time being UTCTime or GeneralizedTime in UTC.

/// One DER element: its tag, its content, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: 1 to 4 length bytes (a certificate is far below 4 GiB).
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The certificate's notAfter, as seconds since the Unix epoch; `None` when
/// `der` is not a certificate this walk understands.
pub(crate) fn not_after(der: &[u8]) -> Option<i64> {
    let (SEQUENCE, cert, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let (mut tag, _, mut rest) = element(tbs)?;
    if tag == VERSION {
        (tag, _, rest) = element(rest)?;
    }
    if tag != INTEGER {
        return None;
    }
    // signature, issuer, then validity.
    let (SEQUENCE, _, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, _, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, validity, _) = element(rest)? else {
        return None;
    };
    let (_, _, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    parse_time(tag, time)
}

/// `YYMMDDHHMMSSZ` (UTCTime, years 1950-2049) or `YYYYMMDDHHMMSSZ`
/// (GeneralizedTime), the only forms RFC 5280 allows.
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = text.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |s: &[u8]| {
        s.iter()
            .fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'))
    };
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = num(&digits[..2]);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (num(&digits[..4]), &digits[4..]),
        _ => return None,
    };
    let [month, day, hour, minute, second] = [0, 2, 4, 6, 8].map(|i| num(&rest[i..i + 2]));
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate rcgen signs with `not_after` set, read back.
    fn issued_until(year: i32, month: u8, day: u8) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["proxy.test".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn reads_not_after_in_both_time_forms() {
        // rcgen writes UTCTime up to 2049 and GeneralizedTime from 2050
        // (RFC 5280 4.1.2.5).
        assert_eq!(not_after(&issued_until(2030, 1, 1)), Some(1_893_456_000));
        assert_eq!(not_after(&issued_until(2027, 3, 1)), Some(1_803_859_200));
        assert_eq!(not_after(&issued_until(2050, 1, 1)), Some(2_524_608_000));
    }

    #[test]
    fn refuses_what_is_not_a_certificate() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        let cert = issued_until(2030, 1, 1);
        // Every cut inside tbsCertificate (where the validity is) is
        // refused, never misread or a panic; the outer length is kept
        // honest so the walk gets past it.
        let (_, body, _) = element(&cert).expect("certificate");
        let (_, _, after_tbs) = element(body).expect("tbs");
        let header = cert.len() - body.len();
        let tbs_end = cert.len() - after_tbs.len();
        for n in header..tbs_end {
            let mut cut = cert[..n].to_vec();
            let inner = u16::try_from(n - header).expect("small certificate");
            cut[header - 2..header].copy_from_slice(&inner.to_be_bytes());
            assert_eq!(not_after(&cut), None, "cut at {n}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(parse_time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20000229120000Z"),
            Some(951_825_600)
        );
        assert_eq!(parse_time(UTC_TIME, b"20000229120000Z"), None);
        assert_eq!(parse_time(UTC_TIME, b"700101000000"), None);
        assert_eq!(parse_time(UTC_TIME, b"701301000000Z"), None);
        assert_eq!(parse_time(UTC_TIME, b"70010100000+Z"), None);
    }
}
