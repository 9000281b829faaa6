//! Credentials out of everything printed. Every address a user hands sagaflow — the database,
//! the broker, Redis, `--server` — goes through [`redact_url`] before it reaches an error, a log
//! line or stdout.

/// Query parameters that carry a secret (`postgres://h/db?password=…`).
const SECRET_PARAMS: &[&str] = &["password", "pass", "passwd", "pwd", "secret", "token"];

/// `scheme://user:secret@host/…?password=secret` → `scheme://user:***@host/…?password=***`.
/// Text that is not a URL (a SQLite path) is returned as it is.
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return redact_by_hand(text);
    };
    let mut changed = false;
    if url.password().is_some() {
        changed |= url.set_password(Some("***")).is_ok();
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs
        .iter()
        .any(|(k, _)| SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()))
    {
        let redacted: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(k, v)| {
                if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) {
                    (k, "***".to_owned())
                } else {
                    (k, v)
                }
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(redacted);
        changed = true;
    }
    if changed {
        url.to_string()
    } else {
        text.to_owned()
    }
}

/// `text` (a library's error message, say) with the password of `url` replaced wherever it
/// appears, in plain or percent-encoded form.
pub fn redact_in(text: &str, url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return text.to_owned();
    };
    let Some(encoded) = parsed.password().filter(|p| !p.is_empty()) else {
        return text.to_owned();
    };
    let plain = url::form_urlencoded::parse(format!("p={encoded}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let mut out = text.replace(encoded, "***");
    if !plain.is_empty() {
        out = out.replace(&plain, "***");
    }
    out
}

/// The `user:secret@` of something URL-like that `url` does not parse.
fn redact_by_hand(text: &str) -> String {
    let Some(s) = text.find("://") else {
        return text.to_owned();
    };
    let authority_end = text[s + 3..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| s + 3 + i);
    match text[..authority_end].rfind('@') {
        Some(at) if at > s => match text[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &text[..s + 3], &text[at..]),
            None => text.to_owned(),
        },
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{redact_in, redact_url};

    #[test]
    fn a_password_is_taken_out_of_other_text() {
        assert_eq!(
            redact_in(
                "connect to http://ops:p%40ss@h:1 failed (p@ss)",
                "http://ops:p%40ss@h:1"
            ),
            "connect to http://ops:***@h:1 failed (***)"
        );
        assert_eq!(redact_in("no secret here", "http://h:1"), "no secret here");
    }

    #[test]
    fn passwords_are_replaced_everywhere_they_hide() {
        for (given, shown) in [
            (
                "postgres://app:s3cret@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("http://ops:pw@host:8080", "http://ops:***@host:8080/"),
            (
                "postgres://db/shop?user=app&password=s3cret",
                "postgres://db/shop?user=app&password=***",
            ),
            ("postgres://app@db/shop", "postgres://app@db/shop"),
            ("sagaflow.db", "sagaflow.db"),
            (
                "sqlite://sagaflow.db?mode=rwc",
                "sqlite://sagaflow.db?mode=rwc",
            ),
            // Not a URL the parser takes, but still credentials.
            ("weird://a:b@[::zz]/x", "weird://a:***@[::zz]/x"),
        ] {
            assert_eq!(redact_url(given), shown, "{given}");
        }
    }
}
