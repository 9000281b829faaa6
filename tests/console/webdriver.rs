//! Just enough of W3C WebDriver (JSON over HTTP) to drive Debian's Chromium through its
//! chromedriver: a session, navigation, finding, clicking and reading elements, a script, a
//! screenshot. Blocking (ureq, which the CLI uses already); run it off the async runtime.
//!
//! Eight endpoints did not justify a WebDriver crate with its own HTTP client and TLS stack.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver gives an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether Debian's Chromium and its driver are installed.
pub fn available() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

/// A chromedriver process and one headless Chromium session on it; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    profile: PathBuf,
}

impl Browser {
    pub fn start() -> Result<Browser, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {CHROMEDRIVER}: {e}"))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(format!(
            "sagaflow-chromium-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            profile,
        };
        let ready = Instant::now();
        loop {
            match browser.call("GET", "/status", None) {
                Ok(v) if v["ready"] == json!(true) => break,
                _ if ready.elapsed() > Duration::from_secs(20) => {
                    return Err("chromedriver did not become ready in 20 s".into());
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        // The flags that keep Chromium off the network this machine does not have.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", browser.profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = browser.call("POST", "/session", Some(caps))?;
        browser.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {v}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command: its `value`, or the driver's error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let answer = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self
                .agent
                .post(&url)
                .send_json(body.unwrap_or_else(|| json!({}))),
        };
        let mut answer = answer.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = answer.status();
        let v: Value = answer
            .body_mut()
            .read_json()
            .map_err(|e| format!("{method} {path}: unreadable answer: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status}: {}",
                v["value"]["message"].as_str().unwrap_or(&v.to_string())
            ));
        }
        Ok(v["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .map(|_| ())
    }

    /// Every element matching the CSS selector now.
    pub fn find_all(&self, css: &str) -> Result<Vec<String>, String> {
        let v = self.session_call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits (up to `limit`) for an element matching `css`, and returns it.
    pub fn wait_for(&self, css: &str, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find_all(css)?.into_iter().next() {
                return Ok(e);
            }
            if start.elapsed() > limit {
                let page = self
                    .script("return location.href + ' (' + document.readyState + '): ' + document.body.innerText.slice(-700) + ' matches: ' + document.querySelectorAll('#saga-rows tr').length + ' errors: ' + JSON.stringify(window.__errors || [])")
                    .unwrap_or_else(Value::String);
                return Err(format!(
                    "no element `{css}` within {limit:?}; the page: {}",
                    page.as_str().unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, element: &str) -> Result<(), String> {
        self.session_call("POST", &format!("/element/{element}/click"), None)
            .map(|_| ())
    }

    pub fn text(&self, element: &str) -> Result<String, String> {
        let v = self.session_call("GET", &format!("/element/{element}/text"), None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// The visible text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> Result<String, String> {
        let e = self
            .find_all(css)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("no element `{css}`"))?;
        self.text(&e)
    }

    /// Types into an element (after clearing it).
    pub fn type_into(&self, element: &str, text: &str) -> Result<(), String> {
        self.session_call("POST", &format!("/element/{element}/clear"), None)?;
        self.session_call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .map(|_| ())
    }

    /// Runs a script in the page and returns what it returns.
    pub fn script(&self, script: &str) -> Result<Value, String> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self, to: &Path) -> Result<(), String> {
        use base64::Engine as _;
        let v = self.session_call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| format!("screenshot: {e}"))?;
        std::fs::write(to, png).map_err(|e| format!("cannot write {}: {e}", to.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_call("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
