//! Who is on the other end of a visitor's connection, as far as the request can tell: browser,
//! operating system and device class from the `User-Agent`, the client's address (the socket peer,
//! or the proxy's forwarded address when the operator trusts the proxy), and an approximate place
//! from a MaxMind GeoIP database.
//!
//! Agents see this next to a conversation ("Chrome 131 on Android 14, London, GB"). It is a hint
//! for a human, never an input to authorization: every header read here is set by the client (or
//! by a proxy the operator vouches for), so the parsers take untrusted input, bound what they
//! examine, and never panic.
//!
//! The user-agent parser is deliberately small and hand-written: a UA database crate is megabytes
//! of regexes to name browsers an agent does not care about. It recognises current browsers and
//! systems, in an order that matters (Chromium-based browsers also say `Chrome/`, every WebKit
//! browser says `Safari/`, iPads say `like Mac OS X`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::HeaderMap;
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// User-Agent
// ---------------------------------------------------------------------------------------------

/// Bytes of a `User-Agent` examined. Real ones stay well under this (a Googlebot smartphone UA,
/// among the longest, is about 230); the rest is padding or abuse and only costs scanning time.
pub const MAX_USER_AGENT_BYTES: usize = 512;

/// The class of device, as far as the user agent says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// Also the answer when nothing says otherwise (bots, unknown clients).
    #[default]
    Desktop,
    Mobile,
    Tablet,
}

impl Device {
    /// A stable lowercase name, for storage and the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Tablet => "tablet",
        }
    }
}

/// What a `User-Agent` says about the client. `browser` is a name with the major version
/// ("Chrome 131", "Samsung Internet 27"), or "Bot" for crawlers and scripted clients; `os` is
/// "Windows", "macOS", "iOS 18", "iPadOS 18", "Android 14", "Linux", "ChromeOS" and a few more.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientInfo {
    pub browser: Option<String>,
    pub os: Option<String>,
    pub device: Device,
}

/// Browser tokens, most specific first: Chromium-based browsers also send `Chrome/`, and Firefox
/// and Chrome on iOS send `Safari/`, so `Chrome/` comes after its derivatives and Safari is
/// decided last (in [`browser`]). Each token must start a word (`Edg/` does not match `XEdg/`).
const BROWSERS: &[(&str, &str)] = &[
    ("SamsungBrowser/", "Samsung Internet"),
    ("Edg/", "Edge"),
    ("EdgA/", "Edge"),
    ("EdgiOS/", "Edge"),
    ("Edge/", "Edge"), // EdgeHTML, before Edge became Chromium-based
    ("OPR/", "Opera"),
    ("OPT/", "Opera"),
    ("YaBrowser/", "Yandex Browser"),
    ("Vivaldi/", "Vivaldi"),
    ("UCBrowser/", "UC Browser"),
    ("FxiOS/", "Firefox"),
    ("Firefox/", "Firefox"),
    ("CriOS/", "Chrome"),
    ("Chromium/", "Chromium"),
    ("Chrome/", "Chrome"),
];

/// Case-insensitive substrings that mark crawlers, previews and scripted clients (besides a word
/// ending in "bot"/"Bot", see [`is_bot`]).
const BOT_MARKERS: &[&str] = &[
    "crawler",
    "spider",
    "slurp",
    "+http",
    "headlesschrome",
    "lighthouse",
    "facebookexternalhit",
    "curl/",
    "wget/",
    "python-",
    "go-http-client",
    "libwww-perl",
    "java/",
    "node-fetch",
    "axios/",
    "scrapy",
    "phantomjs",
];

/// Reads a `User-Agent` header value. Looks at most at the first [`MAX_USER_AGENT_BYTES`] bytes;
/// allocates only the two output strings. Unknown clients give `None`s and [`Device::Desktop`].
///
/// Bots get `browser: Some("Bot")` and no `os` (a crawler's claimed system is a disguise).
/// Known limits of any UA-only parser: Windows 10 and 11 send the same token (both are
/// "Windows"); Chrome's reduced UA says "Android 10" whatever the real version; Safari on an iPad
/// in desktop mode sends a Mac's UA word for word, so it reads as macOS.
pub fn parse_user_agent(ua: &str) -> ClientInfo {
    let ua = head(ua, MAX_USER_AGENT_BYTES);
    if is_bot(ua) {
        return ClientInfo {
            browser: Some("Bot".to_owned()),
            os: None,
            device: Device::Desktop,
        };
    }
    let (os, device) = os_and_device(ua);
    ClientInfo {
        browser: browser(ua),
        os,
        device,
    }
}

fn browser(ua: &str) -> Option<String> {
    for (token, name) in BROWSERS {
        if let Some(rest) = find_token(ua, token) {
            return Some(label(name, major(rest)));
        }
    }
    if let Some(rest) = find_token(ua, "Opera/") {
        // Presto-era Opera: "Opera/9.80 (…) Presto/2.12 Version/12.16".
        let version = find_token(ua, "Version/").and_then(major).or(major(rest));
        return Some(label("Opera", version));
    }
    if let Some(rest) = find_token(ua, "MSIE ") {
        return Some(label("Internet Explorer", major(rest)));
    }
    if find_token(ua, "Trident/").is_some() {
        let version = find_token(ua, "rv:").and_then(major);
        return Some(label("Internet Explorer", version));
    }
    // Every WebKit browser says `Safari/`; only Apple's own gets here (the others matched above).
    // Old Android stock browsers also said it, but they are not Safari.
    if find_token(ua, "Safari/").is_some() && find_token(ua, "Android").is_none() {
        let version = find_token(ua, "Version/").and_then(major);
        return Some(label("Safari", version));
    }
    None
}

fn os_and_device(ua: &str) -> (Option<String>, Device) {
    // Apple mobile first: their UAs also say "like Mac OS X".
    if find_token(ua, "iPad").is_some() {
        return (Some(label("iPadOS", apple_os_major(ua))), Device::Tablet);
    }
    if find_token(ua, "iPhone").is_some() || find_token(ua, "iPod").is_some() {
        return (Some(label("iOS", apple_os_major(ua))), Device::Mobile);
    }
    // Android before Linux: "Linux; Android 14; …".
    if let Some(rest) = find_token(ua, "Android") {
        let version = rest.strip_prefix(' ').and_then(major);
        // Android tablets leave out "Mobile" (Chrome) or say "Tablet" (Firefox).
        let device = if find_token(ua, "Tablet").is_some() || !ua.contains("Mobile") {
            Device::Tablet
        } else {
            Device::Mobile
        };
        return (Some(label("Android", version)), device);
    }
    if ua.contains("Windows Phone") {
        return (Some("Windows Phone".to_owned()), Device::Mobile);
    }
    if let Some(rest) = find_token(ua, "Windows NT ") {
        return (Some(windows_name(rest).to_owned()), Device::Desktop);
    }
    if find_token(ua, "Windows").is_some() {
        return (Some("Windows".to_owned()), Device::Desktop);
    }
    if find_token(ua, "CrOS").is_some() {
        return (Some("ChromeOS".to_owned()), Device::Desktop);
    }
    if find_token(ua, "Macintosh").is_some() || ua.contains("Mac OS X") {
        // A Mac UA with a `Mobile/` build token is an iPad web view in desktop mode; Safari
        // itself in desktop mode is indistinguishable from a Mac.
        if find_token(ua, "Mobile/").is_some() {
            return (Some("iPadOS".to_owned()), Device::Tablet);
        }
        return (Some("macOS".to_owned()), Device::Desktop);
    }
    let device = if ua.contains("Mobi") {
        Device::Mobile
    } else {
        Device::Desktop
    };
    if find_token(ua, "Linux").is_some() || find_token(ua, "X11").is_some() {
        return (Some("Linux".to_owned()), device);
    }
    (None, device)
}

/// "Windows NT 10.0" is both Windows 10 and 11; the UA cannot tell them apart.
fn windows_name(nt_version: &str) -> &'static str {
    const VERSIONS: &[(&str, &str)] = &[
        ("10.0", "Windows"),
        ("6.3", "Windows 8.1"),
        ("6.2", "Windows 8"),
        ("6.1", "Windows 7"),
        ("6.0", "Windows Vista"),
        ("5.1", "Windows XP"),
        ("5.2", "Windows XP"),
    ];
    VERSIONS
        .iter()
        .find(|(nt, _)| nt_version.starts_with(nt))
        .map_or("Windows", |(_, name)| name)
}

/// The major version in "CPU iPhone OS 18_1 like Mac OS X" / "CPU OS 18_1 like Mac OS X".
fn apple_os_major(ua: &str) -> Option<u32> {
    let mut rest = ua;
    while let Some(after) = find_token(rest, "OS ") {
        if let Some(version) = major(after) {
            return Some(version);
        }
        rest = after;
    }
    None
}

fn is_bot(ua: &str) -> bool {
    BOT_MARKERS
        .iter()
        .any(|m| contains_ignore_ascii_case(ua, m))
        || ends_word(ua, "bot")
        || ends_word(ua, "Bot")
}

/// Whether `suffix` occurs at the end of a word ("Googlebot/2.1", "TwitterBot)"). Case-sensitive
/// on purpose: "CUBOT P30" is a phone, not a crawler.
fn ends_word(ua: &str, suffix: &str) -> bool {
    ua.match_indices(suffix).any(|(at, _)| {
        ua.as_bytes()
            .get(at + suffix.len())
            .is_none_or(|b| !b.is_ascii_alphanumeric())
    })
}

/// `needle` must be lowercase ASCII.
fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The text after the first occurrence of `token` that starts a word (is not preceded by a
/// letter or digit), so `Edg/` does not match inside `XEdg/`.
fn find_token<'a>(haystack: &'a str, token: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = haystack.get(from..)?.find(token) {
        let at = from + i;
        let starts_word = at == 0 || !haystack.as_bytes()[at - 1].is_ascii_alphanumeric();
        let end = at + token.len();
        if starts_word {
            return haystack.get(end..);
        }
        from = end;
    }
    None
}

/// The leading decimal number of `s` ("131.0.6778" → 131). Absurdly long runs are not versions.
fn major(s: &str) -> Option<u32> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 6 {
        return None;
    }
    s.get(..digits)?.parse().ok()
}

fn label(name: &str, version: Option<u32>) -> String {
    match version {
        Some(v) => format!("{name} {v}"),
        None => name.to_owned(),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Client address
// ---------------------------------------------------------------------------------------------

/// The client's address: the socket peer, or, when `trust_proxy` is on, what the proxy in front
/// of Hark says it saw.
///
/// Trusted hop: the **right-most** `X-Forwarded-For` entry (the last entry of the last such
/// header line), because a proxy appends the peer it saw to whatever the client sent; everything
/// left of it is the client's own claim. Without any `X-Forwarded-For`, `X-Real-IP` is read. A
/// malformed value (not an address, not UTF-8, empty) gives the socket peer; so does a malformed
/// `X-Forwarded-For` next to a valid `X-Real-IP`, since only one of them is the proxy's.
///
/// Turn `trust_proxy` on only behind exactly one proxy that sets the header read here: one that
/// appends `X-Forwarded-For` (nginx `proxy_add_x_forwarded_for`, Caddy, HAProxy `option
/// forwardfor`), or that overwrites `X-Real-IP` *and* strips any client `X-Forwarded-For`.
/// Otherwise a client picks its own address. Behind a chain of proxies (a CDN, then nginx) this
/// yields the inner proxy's peer, i.e. the CDN's address. IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`, from a dual-stack socket) come back as IPv4.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trust_proxy: bool) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trust_proxy {
        return peer_ip;
    }
    let forwarded = match headers.get_all("x-forwarded-for").iter().next_back() {
        Some(last_line) => last_line
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .and_then(parse_forwarded_addr),
        None => headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_addr),
    };
    forwarded.map_or(peer_ip, |ip| ip.to_canonical())
}

/// "203.0.113.7", "2001:db8::1", and the forms with a port some proxies send ("203.0.113.7:4711",
/// "[2001:db8::1]:4711").
fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

// ---------------------------------------------------------------------------------------------
// GeoIP
// ---------------------------------------------------------------------------------------------

/// An approximate place, with English names. A GeoLite2-Country database gives no city.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// ISO 3166-1 alpha-2, e.g. "GB".
    pub country_code: Option<String>,
    pub country: Option<String>,
    pub city: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    #[error("reading GeoIP database {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("GeoIP database {} is not a MaxMind DB file: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
}

/// A MaxMind DB (GeoIP2/GeoLite2 City or Country, or any database of the same shape), read whole
/// into memory once at startup (tens of MB for GeoLite2-City; no `unsafe` mmap whose file could
/// be replaced underneath). A cheap handle: clones share the database.
#[derive(Clone)]
pub struct GeoIp {
    reader: Arc<maxminddb::Reader<Vec<u8>>>,
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.database_type())
            .finish_non_exhaustive()
    }
}

/// The parts of a City or Country record used here; everything else is skipped while decoding.
#[derive(Deserialize, Default)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Place<'a>,
    #[serde(borrow, default)]
    city: Place<'a>,
}

#[derive(Deserialize, Default)]
struct Place<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    names: Names<'a>,
}

#[derive(Deserialize, Default)]
struct Names<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

impl GeoIp {
    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let bytes = std::fs::read(path).map_err(|source| GeoIpError::Read {
            path: path.to_owned(),
            source,
        })?;
        let reader =
            maxminddb::Reader::from_source(bytes).map_err(|source| GeoIpError::Invalid {
                path: path.to_owned(),
                source,
            })?;
        Ok(GeoIp {
            reader: Arc::new(reader),
        })
    }

    /// The database's own name for its kind, e.g. "GeoLite2-City" (for the startup log).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// Where `ip` is, or `None` when the database has no record for it (private and reserved
    /// ranges, an IPv6 address in an IPv4-only database) or the record names no place. A record
    /// that fails to decode is logged at debug level and treated as absent.
    pub fn lookup(&self, ip: IpAddr) -> Option<Location> {
        let ip = ip.to_canonical();
        if ip.is_ipv6() && self.reader.metadata().ip_version == 4 {
            return None;
        }
        let found = match self.reader.lookup(ip) {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(%error, "GeoIP lookup failed");
                return None;
            }
        };
        let record: Record<'_> = match found.decode() {
            Ok(Some(record)) => record,
            Ok(None) => return None,
            Err(error) => {
                tracing::debug!(%error, "GeoIP record does not decode");
                return None;
            }
        };
        let owned = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
        let location = Location {
            country_code: owned(record.country.iso_code),
            country: owned(record.country.names.en),
            city: owned(record.city.names.en),
        };
        (location != Location::default()).then_some(location)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::HeaderValue;
    use maxminddb_writer::metadata::IpVersion;
    use maxminddb_writer::paths::IpAddrWithMask;
    use proptest::prelude::*;
    use serde::Serialize;

    use super::*;

    // --- User-Agent ----------------------------------------------------------------------

    const DESKTOP: Device = Device::Desktop;
    const MOBILE: Device = Device::Mobile;
    const TABLET: Device = Device::Tablet;

    /// Real user agents: (UA, browser, os, device).
    const USER_AGENTS: &[(&str, Option<&str>, Option<&str>, Device)] = &[
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            Some("Chrome 131"), Some("Windows"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
            Some("Edge 131"), Some("Windows"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/129.0.0.0 Safari/537.36 OPR/114.0.0.0",
            Some("Opera 114"), Some("Windows"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
            Some("Firefox 133"), Some("Windows"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/109.0.0.0 Safari/537.36",
            Some("Chrome 109"), Some("Windows 7"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1.1 Safari/605.1.15",
            Some("Safari 18"), Some("macOS"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            Some("Chrome 131"), Some("macOS"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
            Some("Firefox 133"), Some("Linux"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            Some("Chrome 131"), Some("ChromeOS"), DESKTOP,
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1.1 Mobile/15E148 Safari/604.1",
            Some("Safari 18"), Some("iOS 18"), MOBILE,
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
            Some("Chrome 131"), Some("iOS 17"), MOBILE,
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15",
            Some("Firefox 133"), Some("iOS 18"), MOBILE,
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 EdgiOS/131.2903.68 Mobile/15E148 Safari/605.1.15",
            Some("Edge 131"), Some("iOS 18"), MOBILE,
        ),
        (
            "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
            Some("Safari 18"), Some("iPadOS 18"), TABLET,
        ),
        (
            // An app's web view on an iPad in desktop mode: a Mac UA with an iOS build token.
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
            None, Some("iPadOS"), TABLET,
        ),
        (
            // Chrome's reduced UA: the Android version is frozen at 10, the model at "K".
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
            Some("Chrome 131"), Some("Android 10"), MOBILE,
        ),
        (
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            Some("Chrome 131"), Some("Android 10"), TABLET,
        ),
        (
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36 EdgA/131.0.0.0",
            Some("Edge 131"), Some("Android 10"), MOBILE,
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; SM-S928B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/27.0 Chrome/125.0.0.0 Mobile Safari/537.36",
            Some("Samsung Internet 27"), Some("Android 14"), MOBILE,
        ),
        (
            "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
            Some("Firefox 133"), Some("Android 14"), MOBILE,
        ),
        (
            "Mozilla/5.0 (Android 14; Tablet; rv:133.0) Gecko/133.0 Firefox/133.0",
            Some("Firefox 133"), Some("Android 14"), TABLET,
        ),
        (
            // A phone brand ending in "BOT" is not a crawler.
            "Mozilla/5.0 (Linux; Android 9; CUBOT P30) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
            Some("Chrome 120"), Some("Android 9"), MOBILE,
        ),
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            Some("Bot"), None, DESKTOP,
        ),
        (
            "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.204 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            Some("Bot"), None, DESKTOP,
        ),
        (
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
            Some("Bot"), None, DESKTOP,
        ),
        ("TelegramBot (like TwitterBot)", Some("Bot"), None, DESKTOP),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
            Some("Bot"), None, DESKTOP,
        ),
        ("curl/8.5.0", Some("Bot"), None, DESKTOP),
        ("", None, None, DESKTOP),
        ("Mozilla/5.0", None, None, DESKTOP),
    ];

    #[test]
    fn real_user_agents() {
        for &(ua, browser, os, device) in USER_AGENTS {
            let expected = ClientInfo {
                browser: browser.map(str::to_owned),
                os: os.map(str::to_owned),
                device,
            };
            assert_eq!(parse_user_agent(ua), expected, "{ua}");
        }
    }

    #[test]
    fn safari_on_an_ipad_in_desktop_mode_reads_as_a_mac() {
        // Word for word what Safari on iPadOS 18 sends by default; only JavaScript can tell.
        let ua = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15";
        let info = parse_user_agent(ua);
        assert_eq!(info.os.as_deref(), Some("macOS"));
        assert_eq!(info.device, Device::Desktop);
    }

    #[test]
    fn only_the_head_of_a_long_user_agent_is_read() {
        let padded = format!("{}Chrome/131.0 Windows NT 10.0", "x".repeat(600));
        assert_eq!(parse_user_agent(&padded), ClientInfo::default());
        // The cut lands inside a multi-byte char and backs off to its start.
        let multibyte = format!(
            "{}é{}",
            "a".repeat(MAX_USER_AGENT_BYTES - 1),
            "é".repeat(100)
        );
        assert_eq!(
            head(&multibyte, MAX_USER_AGENT_BYTES).len(),
            MAX_USER_AGENT_BYTES - 1
        );
        assert_eq!(parse_user_agent(&multibyte), ClientInfo::default());
    }

    #[test]
    fn versions_are_bounded_numbers() {
        assert_eq!(major("131.0.6778"), Some(131));
        assert_eq!(major("1234567.0"), None);
        assert_eq!(major(".5"), None);
        assert_eq!(
            parse_user_agent("Mozilla/5.0 (Windows NT 10.0) Chrome/99999999999").browser,
            Some("Chrome".to_owned())
        );
    }

    /// Pieces of real user agents, glued together at random, so the parsers see their tokens
    /// next to truncated versions, odd separators and multi-byte chars.
    fn ua_soup() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("Mozilla/5.0 (".to_owned()),
            Just("Chrome/".to_owned()),
            Just("Edg/".to_owned()),
            Just("OPR/".to_owned()),
            Just("Opera/".to_owned()),
            Just("Version/".to_owned()),
            Just("Safari/".to_owned()),
            Just("Android".to_owned()),
            Just("iPhone OS ".to_owned()),
            Just("iPad".to_owned()),
            Just("Windows NT ".to_owned()),
            Just("Mac OS X".to_owned()),
            Just("MSIE ".to_owned()),
            Just("Trident/".to_owned()),
            Just("rv:".to_owned()),
            Just("bot".to_owned()),
            "[0-9._; /()]{0,4}",
            "\\PC{0,3}",
        ];
        prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn arbitrary_user_agents_never_panic(ua in "\\PC{0,700}") {
            let _ = parse_user_agent(&ua);
        }

        #[test]
        fn token_soup_never_panics(ua in ua_soup()) {
            let info = parse_user_agent(&ua);
            if let Some(b) = &info.browser {
                prop_assert!(b.len() < 40);
            }
        }

        #[test]
        fn arbitrary_forwarding_headers_never_panic(
            xff in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            real in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        ) {
            let peer: SocketAddr = "192.0.2.1:1234".parse().unwrap();
            let mut headers = HeaderMap::new();
            if let Some(v) = xff.and_then(|b| HeaderValue::from_bytes(&b).ok()) {
                headers.insert("x-forwarded-for", v);
            }
            if let Some(v) = real.and_then(|b| HeaderValue::from_bytes(&b).ok()) {
                headers.insert("x-real-ip", v);
            }
            let _ = client_ip(peer, &headers, true);
        }
    }

    // --- Client address --------------------------------------------------------------------

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const PEER: &str = "10.0.0.5:40000";

    #[test]
    fn without_trust_the_headers_are_ignored() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-real-ip", "203.0.113.8"),
        ]);
        assert_eq!(client_ip(PEER.parse().unwrap(), &h, false), ip("10.0.0.5"));
    }

    #[test]
    fn the_right_most_forwarded_entry_is_the_one_the_proxy_saw() {
        let peer = PEER.parse().unwrap();
        // The client forged the first entry; the proxy appended the second.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.7")]);
        assert_eq!(client_ip(peer, &h, true), ip("203.0.113.7"));
        // Over several header lines, the last entry of the last line.
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8,203.0.113.9"),
        ]);
        assert_eq!(client_ip(peer, &h, true), ip("203.0.113.9"));
        // IPv6, and the forms with a port.
        let h = headers(&[("x-forwarded-for", "2001:db8::7")]);
        assert_eq!(client_ip(peer, &h, true), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:4711")]);
        assert_eq!(client_ip(peer, &h, true), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "203.0.113.7:4711")]);
        assert_eq!(client_ip(peer, &h, true), ip("203.0.113.7"));
        // Forwarded-for wins over X-Real-IP.
        let h = headers(&[
            ("x-real-ip", "198.51.100.1"),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(client_ip(peer, &h, true), ip("203.0.113.7"));
    }

    #[test]
    fn x_real_ip_is_read_when_there_is_no_forwarded_for() {
        let h = headers(&[("x-real-ip", " 198.51.100.1 ")]);
        assert_eq!(
            client_ip(PEER.parse().unwrap(), &h, true),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn malformed_headers_give_the_peer() {
        let peer: SocketAddr = PEER.parse().unwrap();
        for bad in [
            "",
            "unknown",
            "203.0.113.7, ",
            "203.0.113.7,garbage",
            "999.1.1.1",
        ] {
            let h = headers(&[("x-forwarded-for", bad)]);
            assert_eq!(client_ip(peer, &h, true), ip("10.0.0.5"), "{bad:?}");
        }
        // A broken X-Forwarded-For does not fall through to a (possibly client-set) X-Real-IP.
        let h = headers(&[("x-forwarded-for", "junk"), ("x-real-ip", "198.51.100.1")]);
        assert_eq!(client_ip(peer, &h, true), ip("10.0.0.5"));
        let h = headers(&[("x-real-ip", "not an address")]);
        assert_eq!(client_ip(peer, &h, true), ip("10.0.0.5"));
        // Not UTF-8.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.\xff").unwrap(),
        );
        assert_eq!(client_ip(peer, &h, true), ip("10.0.0.5"));
        // No headers at all.
        assert_eq!(client_ip(peer, &HeaderMap::new(), true), ip("10.0.0.5"));
    }

    #[test]
    fn ipv4_mapped_addresses_come_back_as_ipv4() {
        let peer: SocketAddr = "[::ffff:203.0.113.7]:443".parse().unwrap();
        assert_eq!(client_ip(peer, &HeaderMap::new(), false), ip("203.0.113.7"));
        let h = headers(&[("x-forwarded-for", "::ffff:198.51.100.1")]);
        assert_eq!(client_ip(peer, &h, true), ip("198.51.100.1"));
    }

    // --- GeoIP -----------------------------------------------------------------------------

    /// A GeoIP2-shaped record, as MaxMind writes them (only the fields under test, plus a
    /// few that the reader must skip).
    #[derive(Serialize, Default)]
    struct TestRecord {
        #[serde(skip_serializing_if = "Option::is_none")]
        city: Option<TestPlace>,
        #[serde(skip_serializing_if = "Option::is_none")]
        country: Option<TestPlace>,
        #[serde(skip_serializing_if = "Option::is_none")]
        registered_country: Option<TestPlace>,
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<TestCoordinates>,
    }

    #[derive(Serialize)]
    struct TestPlace {
        geoname_id: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        iso_code: Option<&'static str>,
        names: BTreeMap<&'static str, &'static str>,
    }

    #[derive(Serialize)]
    struct TestCoordinates {
        latitude: f64,
        longitude: f64,
        time_zone: &'static str,
    }

    fn country(code: &'static str, en: &'static str, de: &'static str) -> TestPlace {
        TestPlace {
            geoname_id: 1,
            iso_code: Some(code),
            names: BTreeMap::from([("en", en), ("de", de)]),
        }
    }

    fn city(en: &'static str) -> TestPlace {
        TestPlace {
            geoname_id: 2,
            iso_code: None,
            names: BTreeMap::from([("en", en), ("ru", "город")]),
        }
    }

    /// Writes a real MaxMind DB file holding `networks` (IPv4 ones are placed under `::/96` in
    /// an IPv6 tree, as MaxMind does) and returns its path inside `dir`.
    fn write_db(
        dir: &Path,
        database_type: &str,
        ip_version: IpVersion,
        networks: Vec<(&str, TestRecord)>,
    ) -> PathBuf {
        let mut db = maxminddb_writer::Database::default();
        db.metadata.ip_version = ip_version;
        db.metadata.binary_format_major_version = 2;
        db.metadata.database_type = database_type.to_owned();
        db.metadata.languages = vec!["en".to_owned(), "de".to_owned()];
        db.metadata
            .description
            .insert("en".to_owned(), "Hark test database".to_owned());
        for (cidr, record) in networks {
            let mut net: IpAddrWithMask = cidr.parse().unwrap();
            if let (IpVersion::V6, IpAddr::V4(v4)) = (ip_version, net.addr) {
                net = IpAddrWithMask::new(IpAddr::V6(v4.to_ipv6_compatible()), net.mask + 96);
            }
            let data = db.insert_value(record).unwrap();
            db.insert_node(net, data);
        }
        let path = dir.join(format!("{database_type}.mmdb"));
        let file = std::fs::File::create(&path).unwrap();
        db.write_to(std::io::BufWriter::new(file)).unwrap();
        path
    }

    fn city_db(dir: &Path) -> PathBuf {
        write_db(
            dir,
            "GeoLite2-City",
            IpVersion::V6,
            vec![
                (
                    "81.2.69.0/24",
                    TestRecord {
                        city: Some(city("London")),
                        country: Some(country("GB", "United Kingdom", "Vereinigtes Königreich")),
                        location: Some(TestCoordinates {
                            latitude: 51.5142,
                            longitude: -0.0931,
                            time_zone: "Europe/London",
                        }),
                        ..TestRecord::default()
                    },
                ),
                (
                    "2.125.160.216/29",
                    TestRecord {
                        city: Some(city("Boxford")),
                        country: Some(country("GB", "United Kingdom", "Vereinigtes Königreich")),
                        ..TestRecord::default()
                    },
                ),
                (
                    "89.160.20.112/28",
                    TestRecord {
                        city: Some(city("Linköping")),
                        country: Some(country("SE", "Sweden", "Schweden")),
                        ..TestRecord::default()
                    },
                ),
                (
                    "2001:db8::/32",
                    TestRecord {
                        city: Some(city("Tokyo")),
                        country: Some(country("JP", "Japan", "Japan")),
                        ..TestRecord::default()
                    },
                ),
                (
                    // Anycast-style: only where the block is registered, not where it is.
                    "192.0.2.0/24",
                    TestRecord {
                        registered_country: Some(country("US", "United States", "USA")),
                        ..TestRecord::default()
                    },
                ),
            ],
        )
    }

    fn place(code: &str, country: &str, city: Option<&str>) -> Option<Location> {
        Some(Location {
            country_code: Some(code.to_owned()),
            country: Some(country.to_owned()),
            city: city.map(str::to_owned),
        })
    }

    #[test]
    fn a_city_database_finds_ipv4_and_ipv6_networks() {
        let dir = tempfile::tempdir().unwrap();
        let geo = GeoIp::open(&city_db(dir.path())).unwrap();
        assert_eq!(geo.database_type(), "GeoLite2-City");

        let london = place("GB", "United Kingdom", Some("London"));
        assert_eq!(geo.lookup(ip("81.2.69.160")), london);
        assert_eq!(geo.lookup(ip("81.2.69.0")), london);
        assert_eq!(geo.lookup(ip("81.2.69.255")), london);
        // The same address as seen on a dual-stack socket.
        assert_eq!(geo.lookup(ip("::ffff:81.2.69.160")), london);
        assert_eq!(
            geo.lookup(ip("2.125.160.219")),
            place("GB", "United Kingdom", Some("Boxford"))
        );
        assert_eq!(
            geo.lookup(ip("89.160.20.120")),
            place("SE", "Sweden", Some("Linköping"))
        );
        assert_eq!(
            geo.lookup(ip("2001:db8:1234::1")),
            place("JP", "Japan", Some("Tokyo"))
        );
    }

    #[test]
    fn a_city_database_misses_outside_its_networks() {
        let dir = tempfile::tempdir().unwrap();
        let geo = GeoIp::open(&city_db(dir.path())).unwrap();
        for miss in [
            "81.2.70.1",     // next /24
            "2.125.160.224", // just past the /29
            "89.160.20.128", // just past the /28
            "127.0.0.1",     // loopback
            "10.1.2.3",      // private
            "2001:db9::1",   // next /32
            "::1",           // IPv6 loopback
            "192.0.2.10",    // a record, but no country or city in it
        ] {
            assert_eq!(geo.lookup(ip(miss)), None, "{miss}");
        }
    }

    #[test]
    fn a_country_database_gives_no_city() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_db(
            dir.path(),
            "GeoLite2-Country",
            IpVersion::V4,
            vec![
                (
                    "81.2.69.0/24",
                    TestRecord {
                        country: Some(country("GB", "United Kingdom", "Vereinigtes Königreich")),
                        registered_country: Some(country("GB", "United Kingdom", "UK")),
                        ..TestRecord::default()
                    },
                ),
                (
                    "89.160.20.112/28",
                    TestRecord {
                        country: Some(country("SE", "Sweden", "Schweden")),
                        ..TestRecord::default()
                    },
                ),
            ],
        );
        let geo = GeoIp::open(&path).unwrap();
        assert_eq!(
            geo.lookup(ip("81.2.69.160")),
            place("GB", "United Kingdom", None)
        );
        assert_eq!(geo.lookup(ip("89.160.20.113")), place("SE", "Sweden", None));
        assert_eq!(geo.lookup(ip("8.8.8.8")), None);
        // An IPv4-only tree has no IPv6 addresses, but does know mapped IPv4 ones.
        assert_eq!(geo.lookup(ip("2001:db8::1")), None);
        assert_eq!(
            geo.lookup(ip("::ffff:89.160.20.113")),
            place("SE", "Sweden", None)
        );
    }

    #[test]
    fn open_errors_name_the_file_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.mmdb");
        let err = GeoIp::open(&missing).unwrap_err();
        assert!(matches!(err, GeoIpError::Read { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("nope.mmdb") && msg.contains("No such file"),
            "{msg}"
        );

        let garbage = dir.path().join("garbage.mmdb");
        std::fs::write(&garbage, b"this is not a MaxMind database").unwrap();
        let err = GeoIp::open(&garbage).unwrap_err();
        assert!(matches!(err, GeoIpError::Invalid { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("garbage.mmdb") && msg.contains("not a MaxMind DB"),
            "{msg}"
        );
    }
}
