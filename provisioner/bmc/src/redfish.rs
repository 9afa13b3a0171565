//! Redfish (DMTF DSP0266) over HTTPS with reqwest/rustls: ComputerSystem reset and boot
//! override, VirtualMedia, log services and thermal readings, with a SessionService token
//! (HTTP basic authentication when the service has no sessions).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{
    BmcDriver, BmcError, BmcProtocol, BmcTarget, BootDevice, BootOverride, Capabilities,
    ChassisStatus, Identity, Password, PowerAction, PowerState, Result, SelEntry, SensorReading,
};

#[derive(Debug, Clone)]
enum Auth {
    Token {
        token: Password,
        location: Option<String>,
    },
    Basic,
}

#[derive(Debug)]
pub struct RedfishDriver {
    target: BmcTarget,
    base: String,
    client: reqwest::Client,
    auth: Mutex<Option<Auth>>,
}

/// Maps a Redfish boot source override target to kiln's device and back.
fn boot_target(device: BootDevice) -> &'static str {
    match device {
        BootDevice::None => "None",
        BootDevice::Pxe => "Pxe",
        BootDevice::Disk => "Hdd",
        BootDevice::Cdrom => "Cd",
        BootDevice::BiosSetup => "BiosSetup",
    }
}

fn parse_boot(boot: &Value) -> BootOverride {
    let enabled = boot["BootSourceOverrideEnabled"]
        .as_str()
        .unwrap_or("Disabled");
    let device = match boot["BootSourceOverrideTarget"].as_str().unwrap_or("None") {
        _ if enabled == "Disabled" => BootDevice::None,
        "Pxe" => BootDevice::Pxe,
        "Hdd" => BootDevice::Disk,
        "Cd" => BootDevice::Cdrom,
        "BiosSetup" => BootDevice::BiosSetup,
        _ => BootDevice::None,
    };
    BootOverride {
        device,
        persistent: enabled == "Continuous",
        uefi: boot["BootSourceOverrideMode"].as_str() == Some("UEFI"),
    }
}

fn reset_type(action: PowerAction) -> &'static str {
    match action {
        PowerAction::On => "On",
        PowerAction::Off => "ForceOff",
        PowerAction::SoftOff => "GracefulShutdown",
        PowerAction::Cycle => "PowerCycle",
        PowerAction::Reset => "ForceRestart",
    }
}

fn odata_id(v: &Value) -> Option<String> {
    v["@odata.id"].as_str().map(str::to_string)
}

impl RedfishDriver {
    pub fn new(target: BmcTarget) -> Result<RedfishDriver> {
        // One TLS provider process-wide; a no-op when the CLI installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(target.timeout)
            .connect_timeout(target.timeout);
        if let Some(ca) = &target.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| BmcError::Tls(format!("reading CA {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| BmcError::Tls(format!("parsing CA {}: {e}", ca.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        if target.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| BmcError::Tls(format!("building the HTTPS client: {e}")))?;
        if target.host.starts_with("http://") {
            if !target.plain_http {
                return Err(BmcError::Protocol(format!(
                    "{} is plain http: the BMC credentials would travel unencrypted; use \
                     https, or allow it explicitly (--allow-plain-http, inventory \
                     allowPlainHttp: true)",
                    target.host
                )));
            }
            tracing::warn!(
                bmc = %target.host,
                "Redfish over plain http: credentials travel unencrypted"
            );
        }
        let base = if target.host.contains("://") {
            target.host.trim_end_matches('/').to_string()
        } else if target.host.contains(':') {
            format!("https://[{}]:{}", target.host, target.port)
        } else {
            format!("https://{}:{}", target.host, target.port)
        };
        Ok(RedfishDriver {
            target,
            base,
            client,
            auth: Mutex::new(None),
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> BmcError {
        if e.is_timeout() {
            return BmcError::Timeout {
                target: self.target.label(),
                after: self.target.timeout,
            };
        }
        // Certificate trouble shows up as a connect error whose chain names the TLS cause.
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        if chain.contains("certificate") || chain.contains("UnknownIssuer") {
            return BmcError::Tls(format!(
                "{}: {chain} (give the BMC's CA with --ca-cert, or --insecure)",
                self.target.label()
            ));
        }
        BmcError::Unreachable {
            target: self.target.label(),
            reason: chain,
        }
    }

    async fn login(&self) -> Result<Auth> {
        let root = self.send(Method::GET, "/redfish/v1/", None, None).await?;
        let sessions = root["Links"]["Sessions"]["@odata.id"]
            .as_str()
            .map(str::to_string);
        let Some(sessions) = sessions else {
            return Ok(Auth::Basic);
        };
        let body = json!({
            "UserName": self.target.username,
            "Password": self.target.password.expose(),
        });
        let response = self
            .client
            .post(format!("{}{sessions}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        match response.status() {
            s if s.is_success() => {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                match header("X-Auth-Token") {
                    Some(token) => Ok(Auth::Token {
                        token: Password::new(token),
                        location: header("Location"),
                    }),
                    None => Ok(Auth::Basic),
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(BmcError::Auth(format!(
                "the Redfish service refused user {:?}",
                self.target.username
            ))),
            // A service that lists sessions but cannot create them: fall back to basic.
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(Auth::Basic),
            s => Err(BmcError::Http {
                request: format!("POST {sessions}"),
                status: s.as_u16(),
                message: response.text().await.unwrap_or_default(),
            }),
        }
    }

    /// One HTTP request; `auth` None means unauthenticated (the service root).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        auth: Option<&Auth>,
    ) -> Result<Value> {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut request = self.client.request(method.clone(), &url);
        match auth {
            Some(Auth::Token { token, .. }) => {
                request = request.header("X-Auth-Token", token.expose())
            }
            Some(Auth::Basic) => {
                request =
                    request.basic_auth(&self.target.username, Some(self.target.password.expose()))
            }
            None => {}
        }
        if let Some(b) = body {
            request = request.json(b);
        }
        tracing::debug!(bmc = %self.target.label(), %method, path, "redfish request");
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| self.transport_error(e))?;
        let what = format!("{method} {path}");
        match status {
            s if s.is_success() => {
                if text.trim().is_empty() {
                    Ok(Value::Null)
                } else {
                    serde_json::from_str(&text)
                        .map_err(|e| BmcError::Protocol(format!("{what}: {e}")))
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(BmcError::Auth(format!("{what}: HTTP {}", status.as_u16())))
            }
            StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED => Err(BmcError::Unsupported(what)),
            s => Err(BmcError::Http {
                request: what,
                status: s.as_u16(),
                message: redfish_message(&text),
            }),
        }
    }

    /// An authenticated request; logs in first, and once more if the token expired.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        for attempt in 0..2 {
            let auth = {
                let mut guard = self.auth.lock().await;
                if guard.is_none() {
                    *guard = Some(self.login().await?);
                }
                guard.clone().expect("logged in above")
            };
            match self.send(method.clone(), path, body, Some(&auth)).await {
                Err(BmcError::Auth(_)) if attempt == 0 && matches!(auth, Auth::Token { .. }) => {
                    *self.auth.lock().await = None;
                }
                r => return r,
            }
        }
        unreachable!("the second attempt always returns")
    }

    async fn first_member(&self, collection: &str) -> Result<String> {
        let c = self.call(Method::GET, collection, None).await?;
        c["Members"]
            .as_array()
            .and_then(|m| m.first())
            .and_then(odata_id)
            .ok_or_else(|| BmcError::Unsupported(format!("{collection} has no members")))
    }

    async fn system(&self) -> Result<(String, Value)> {
        let path = self.first_member("/redfish/v1/Systems").await?;
        let value = self.call(Method::GET, &path, None).await?;
        Ok((path, value))
    }

    async fn virtual_media_slot(&self) -> Result<String> {
        let manager = self.first_member("/redfish/v1/Managers").await?;
        let m = self.call(Method::GET, &manager, None).await?;
        let collection = odata_id(&m["VirtualMedia"])
            .ok_or_else(|| BmcError::Unsupported("virtual media".into()))?;
        let list = self.call(Method::GET, &collection, None).await?;
        let members: Vec<String> = list["Members"]
            .as_array()
            .map(|m| m.iter().filter_map(odata_id).collect())
            .unwrap_or_default();
        // Prefer a CD/DVD slot: installers boot from an ISO.
        for member in &members {
            let slot = self.call(Method::GET, member, None).await?;
            let types = slot["MediaTypes"].as_array().cloned().unwrap_or_default();
            if types
                .iter()
                .any(|t| matches!(t.as_str(), Some("CD" | "DVD")))
            {
                return Ok(member.clone());
            }
        }
        members
            .into_iter()
            .next()
            .ok_or_else(|| BmcError::Unsupported("virtual media (no slots)".into()))
    }

    async fn log_service(&self) -> Result<String> {
        let manager = self.first_member("/redfish/v1/Managers").await?;
        let m = self.call(Method::GET, &manager, None).await?;
        let services = odata_id(&m["LogServices"])
            .ok_or_else(|| BmcError::Unsupported("log services".into()))?;
        self.first_member(&services).await
    }
}

fn redfish_message(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return text.chars().take(200).collect();
    };
    let err = &v["error"];
    err["@Message.ExtendedInfo"]
        .as_array()
        .and_then(|i| i.first())
        .and_then(|i| i["Message"].as_str())
        .or_else(|| err["message"].as_str())
        .unwrap_or("")
        .to_string()
}

fn power_state(v: &Value) -> Result<PowerState> {
    match v["PowerState"].as_str() {
        Some("On" | "PoweringOff") => Ok(PowerState::On),
        Some("Off" | "PoweringOn") => Ok(PowerState::Off),
        other => Err(BmcError::Protocol(format!(
            "system PowerState is {other:?}"
        ))),
    }
}

#[async_trait::async_trait]
impl BmcDriver for RedfishDriver {
    fn protocol(&self) -> BmcProtocol {
        BmcProtocol::Redfish
    }

    async fn power_status(&self) -> Result<PowerState> {
        power_state(&self.system().await?.1)
    }

    async fn power(&self, action: PowerAction) -> Result<()> {
        let (_, system) = self.system().await?;
        let reset = &system["Actions"]["#ComputerSystem.Reset"];
        let target = reset["target"]
            .as_str()
            .ok_or_else(|| BmcError::Unsupported("ComputerSystem.Reset".into()))?;
        let allowed: Option<Vec<&str>> = reset["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect());
        let is_allowed = |t: &str| allowed.as_ref().is_none_or(|a| a.contains(&t));
        let mut wanted = reset_type(action);
        // Services without PowerCycle restart the machine with ForceRestart instead.
        if action == PowerAction::Cycle && !is_allowed(wanted) {
            wanted = "ForceRestart";
        }
        if !is_allowed(wanted) {
            return Err(BmcError::Unsupported(format!("reset type {wanted}")));
        }
        self.call(Method::POST, target, Some(&json!({"ResetType": wanted})))
            .await
            .map(drop)
    }

    async fn boot_override(&self) -> Result<BootOverride> {
        Ok(parse_boot(&self.system().await?.1["Boot"]))
    }

    async fn set_boot_override(&self, boot: BootOverride) -> Result<()> {
        let (path, system) = self.system().await?;
        let target = boot_target(boot.device);
        if let Some(allowed) =
            system["Boot"]["BootSourceOverrideTarget@Redfish.AllowableValues"].as_array()
            && boot.device != BootDevice::None
            && !allowed.iter().any(|a| a.as_str() == Some(target))
        {
            return Err(BmcError::Unsupported(format!(
                "boot override target {target}"
            )));
        }
        let body = if boot.device == BootDevice::None {
            json!({"Boot": {"BootSourceOverrideEnabled": "Disabled"}})
        } else {
            json!({"Boot": {
                "BootSourceOverrideTarget": target,
                "BootSourceOverrideEnabled": if boot.persistent { "Continuous" } else { "Once" },
                "BootSourceOverrideMode": if boot.uefi { "UEFI" } else { "Legacy" },
            }})
        };
        self.call(Method::PATCH, &path, Some(&body)).await.map(drop)
    }

    async fn chassis_status(&self) -> Result<ChassisStatus> {
        let (_, system) = self.system().await?;
        let health = system["Status"]["Health"].as_str().unwrap_or("OK");
        Ok(ChassisStatus {
            power: power_state(&system)?,
            power_fault: health == "Critical",
            power_overload: false,
            power_interlock: false,
            cooling_fault: false,
            drive_fault: false,
            intrusion: false,
            restore_policy: match system["PowerRestorePolicy"].as_str() {
                Some("AlwaysOn") => "always-on",
                Some("LastState") => "previous",
                Some("AlwaysOff") => "always-off",
                _ => "unknown",
            }
            .to_string(),
        })
    }

    async fn identity(&self) -> Result<Identity> {
        let (_, s) = self.system().await?;
        let text = |k: &str| s[k].as_str().filter(|v| !v.is_empty()).map(str::to_string);
        Ok(Identity {
            vendor: text("Manufacturer"),
            model: text("Model"),
            serial: text("SerialNumber"),
            firmware: text("BiosVersion"),
        })
    }

    async fn sel(&self) -> Result<Vec<SelEntry>> {
        let service = self.log_service().await?;
        let s = self.call(Method::GET, &service, None).await?;
        let entries =
            odata_id(&s["Entries"]).ok_or_else(|| BmcError::Unsupported("log entries".into()))?;
        let list = self.call(Method::GET, &entries, None).await?;
        Ok(list["Members"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, e)| SelEntry {
                id: e["Id"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i as u16 + 1),
                timestamp: None,
                message: [e["Created"].as_str(), e["Message"].as_str()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect())
    }

    async fn clear_sel(&self) -> Result<()> {
        let service = self.log_service().await?;
        let s = self.call(Method::GET, &service, None).await?;
        let target = s["Actions"]["#LogService.ClearLog"]["target"]
            .as_str()
            .ok_or_else(|| BmcError::Unsupported("LogService.ClearLog".into()))?
            .to_string();
        self.call(Method::POST, &target, Some(&json!({})))
            .await
            .map(drop)
    }

    async fn sensors(&self) -> Result<Vec<SensorReading>> {
        let chassis = self.first_member("/redfish/v1/Chassis").await?;
        let c = self.call(Method::GET, &chassis, None).await?;
        let thermal = odata_id(&c["Thermal"])
            .ok_or_else(|| BmcError::Unsupported("thermal readings".into()))?;
        let t = self.call(Method::GET, &thermal, None).await?;
        let mut out = Vec::new();
        for temp in t["Temperatures"].as_array().into_iter().flatten() {
            let value = temp["ReadingCelsius"].as_f64();
            out.push(SensorReading {
                name: temp["Name"].as_str().unwrap_or("temperature").to_string(),
                value,
                unit: "degrees C".into(),
                display: value.map(|v| format!("{v} degrees C")).unwrap_or_default(),
            });
        }
        for fan in t["Fans"].as_array().into_iter().flatten() {
            let value = fan["Reading"].as_f64();
            let unit = fan["ReadingUnits"].as_str().unwrap_or("RPM").to_string();
            out.push(SensorReading {
                name: fan["Name"].as_str().unwrap_or("fan").to_string(),
                value,
                display: value.map(|v| format!("{v} {unit}")).unwrap_or_default(),
                unit,
            });
        }
        Ok(out)
    }

    async fn insert_media(&self, image_url: &str) -> Result<()> {
        let slot = self.virtual_media_slot().await?;
        let body = json!({"Image": image_url, "Inserted": true, "WriteProtected": true});
        let action = format!("{slot}/Actions/VirtualMedia.InsertMedia");
        self.call(Method::POST, &action, Some(&body))
            .await
            .map(drop)
    }

    async fn eject_media(&self) -> Result<()> {
        let slot = self.virtual_media_slot().await?;
        let action = format!("{slot}/Actions/VirtualMedia.EjectMedia");
        self.call(Method::POST, &action, Some(&json!({})))
            .await
            .map(drop)
    }

    async fn probe(&self) -> Result<Capabilities> {
        let root = self.send(Method::GET, "/redfish/v1/", None, None).await?;
        let (_, system) = self.system().await?;
        let auth = self.auth.lock().await.clone();
        let mut caps = Capabilities {
            protocol: "redfish".into(),
            authenticated: true,
            power: power_state(&system).ok(),
            boot_override: system["Boot"].is_object(),
            version: root["RedfishVersion"].as_str().map(str::to_string),
            ..Capabilities::default()
        };
        caps.notes.push(match auth {
            Some(Auth::Token { .. }) => "session token authentication".into(),
            _ => "HTTP basic authentication (no SessionService)".into(),
        });
        match self.virtual_media_slot().await {
            Ok(_) => caps.virtual_media = true,
            Err(BmcError::Unsupported(what)) => caps.notes.push(format!("no {what}")),
            Err(e) => return Err(e),
        }
        Ok(caps)
    }

    async fn close(&self) -> Result<()> {
        let auth = self.auth.lock().await.take();
        if let Some(Auth::Token {
            token,
            location: Some(location),
        }) = auth
        {
            let auth = Auth::Token {
                token,
                location: None,
            };
            self.send(Method::DELETE, &location, None, Some(&auth))
                .await
                .map(drop)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, plain_http: bool) -> BmcTarget {
        BmcTarget {
            protocol: BmcProtocol::Redfish,
            host: host.into(),
            port: 443,
            username: "admin".into(),
            password: Password::new("hunter2"),
            ca_cert: None,
            insecure: false,
            plain_http,
            timeout: std::time::Duration::from_secs(1),
            retries: 0,
            cipher_suite: crate::ipmi::CipherSuite::Suite3,
        }
    }

    #[test]
    fn plain_http_needs_an_explicit_opt_in() {
        let err = RedfishDriver::new(target("http://127.0.0.1:8000", false)).unwrap_err();
        assert!(err.to_string().contains("--allow-plain-http"), "{err}");
        assert!(RedfishDriver::new(target("http://127.0.0.1:8000", true)).is_ok());
        assert!(RedfishDriver::new(target("https://127.0.0.1:8000", false)).is_ok());
    }

    #[test]
    fn session_tokens_never_show_in_debug_output() {
        let auth = Auth::Token {
            token: Password::new("0123-secret-token"),
            location: Some("/redfish/v1/SessionService/Sessions/1".into()),
        };
        let text = format!("{auth:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }

    #[test]
    fn boot_override_mapping() {
        let b = parse_boot(&json!({
            "BootSourceOverrideEnabled": "Continuous",
            "BootSourceOverrideTarget": "Pxe",
            "BootSourceOverrideMode": "UEFI"
        }));
        assert_eq!(
            b,
            BootOverride {
                device: BootDevice::Pxe,
                persistent: true,
                uefi: true
            }
        );
        let off = parse_boot(&json!({
            "BootSourceOverrideEnabled": "Disabled",
            "BootSourceOverrideTarget": "Pxe"
        }));
        assert_eq!(off.device, BootDevice::None);
    }

    #[test]
    fn error_messages_come_from_extended_info() {
        let text = r#"{"error":{"code":"Base.1.0.GeneralError","message":"general",
            "@Message.ExtendedInfo":[{"Message":"The reset type is not supported"}]}}"#;
        assert_eq!(redfish_message(text), "The reset type is not supported");
        assert_eq!(redfish_message("plain"), "plain");
    }
}
