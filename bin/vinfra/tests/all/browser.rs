//! A small WebDriver client driving Debian's `chromium` headless through `chromedriver`
//! (W3C WebDriver over HTTP/JSON with the reqwest already in the tree; nothing downloads
//! a browser). One browser per test: starting Chromium costs about a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use test_utils::ChildGuard;

/// W3C's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long waits for the page to show something last.
pub const WAIT: Duration = Duration::from_secs(120);

pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    _profile: tempfile::TempDir,
    driver: ChildGuard,
    log: PathBuf,
    /// Where screenshots go.
    shots: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; panics naming
    /// `scripts/setup.sh` when either is missing.
    pub async fn start() -> Browser {
        let hint = "run scripts/setup.sh (installs Debian's chromium and chromium-driver)";
        let chromium = test_utils::require_tool("chromium", hint).unwrap_or_else(|e| panic!("{e}"));
        let driver_bin =
            test_utils::require_tool("chromedriver", hint).unwrap_or_else(|e| panic!("{e}"));
        let profile = tempfile::Builder::new()
            .prefix("vinfra-chromium")
            .tempdir_in("/tmp")
            .unwrap();
        let log = profile.path().join("chromedriver.log");
        let port = test_utils::free_tcp_port();
        let driver = ChildGuard::new(
            Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn chromedriver"),
        );
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let ready = test_utils::wait_for(Duration::from_secs(20), || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move {
                match http.get(url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == true),
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(ready.is_ok(), "chromedriver did not come up");
        let user_data = profile.path().join("profile");
        // The flags this machine needs (docs/UI.md): no sandbox as root, and no background
        // connections, which the closed network refuses many at a time.
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,1000".to_owned(),
            format!("--user-data-dir={}", user_data.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new WebDriver session")
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "chromium did not start: {r}\n{}",
                    test_utils::log_tail(&log, 30)
                )
            })
            .to_owned();
        let shots = match std::env::var_os("VINFRA_SCREENSHOTS") {
            Some(d) => PathBuf::from(d),
            None => profile.path().join("shots"),
        };
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            http,
            session: format!("{base}/session/{id}"),
            _profile: profile,
            driver,
            log,
            shots,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        v["value"].clone()
    }

    /// Like `call`, but a WebDriver error is `Err` (an element not there yet).
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let v = self.call(method, path, body).await;
        match v.get("error") {
            Some(e) => Err(format!("{e}: {}", v["message"])),
            None => Ok(v),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.try_call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}\nchromedriver:\n{}", self.log()));
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn find(&self, css: &str) -> Result<String, String> {
        let v = self
            .try_call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element id in {v}"))
    }

    /// The element `css` once it is there.
    async fn element(&self, css: &str) -> String {
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.find(css).await {
                Ok(e) => return e,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "no element {css}: {last}\npage text:\n{}",
            self.body_text().await
        );
    }

    pub async fn click(&self, css: &str) {
        // A live region may replace the element between finding and clicking: retry.
        for _ in 0..10 {
            let e = self.element(css).await;
            if self
                .try_call(
                    reqwest::Method::POST,
                    &format!("/element/{e}/click"),
                    Some(json!({})),
                )
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("cannot click {css}");
    }

    /// Clears the field `css` and types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.try_call(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await
        .unwrap_or_else(|err| panic!("clear {css}: {err}"));
        self.type_keys(css, text).await;
    }

    /// Types `text` into `css` (focused first) without clearing it: keys for any
    /// focusable element (WebDriver's key codes, `\u{E003}` Backspace, `\u{E007}` Enter).
    pub async fn type_keys(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.try_call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await
        .unwrap_or_else(|err| panic!("type into {css}: {err}"));
    }

    /// Chooses the local file `path` in the file input `css` (WebDriver types its path).
    pub async fn choose_file(&self, css: &str, path: &std::path::Path) {
        self.type_keys(css, &path.display().to_string()).await;
    }

    /// Logs in to the dashboard at `base` with `token` from the login page.
    pub async fn log_in(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui/login")).await;
        self.fill("#token", token).await;
        self.click("form[action='/ui/login'] button[type=submit]")
            .await;
        self.wait_for_text("h1", "Hosts").await;
    }

    /// Picks the option with `value` of the select `css`.
    pub async fn select(&self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]"))
            .await;
    }

    /// Runs `script` (a function body; `arguments` as given) and returns its value.
    pub async fn exec(&self, script: &str, args: Value) -> Value {
        self.try_call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The text of `css` (empty when absent).
    pub async fn text(&self, css: &str) -> String {
        self.exec(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    pub async fn body_text(&self) -> String {
        self.try_call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": "return document.body ? document.body.innerText : '';", "args": []})),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
    }

    /// Waits until `css`'s text satisfies `ok`; returns it.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut t = String::new();
        while tokio::time::Instant::now() < deadline {
            t = self.text(css).await;
            if ok(&t) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{css} never showed {what}; last text: {t:?}\npage:\n{}",
            self.body_text().await
        );
    }

    /// Waits until `css`'s text contains `needle`.
    pub async fn wait_for_text(&self, css: &str, needle: &str) -> String {
        self.wait_text(css, needle, |t| t.contains(needle)).await
    }

    /// A PNG of the viewport as `name.png` in the screenshot dir (`VINFRA_SCREENSHOTS`,
    /// e.g. `docs/ui`, or a temp dir).
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot data"))
            .expect("screenshot base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub fn log(&self) -> String {
        test_utils::log_tail(Path::new(&self.log), 30)
    }

    /// Ends the session and the driver (Chromium with it).
    pub async fn quit(mut self) {
        let _ = self.try_call(reqwest::Method::DELETE, "", None).await;
        self.driver.kill();
    }
}
