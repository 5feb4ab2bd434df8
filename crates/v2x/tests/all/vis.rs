//! The MEC service on 127.0.0.1: V2X API, authorization, and every `/vis/v2` resource, each
//! response and notification checked against the MEC 030 document.

use std::time::Duration;

use axum::routing::post;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use v2x::serve::{start, MecHandle, ServeOptions};
use v2x::types::Plmn;
use v2x::ws::WsClient;

use crate::{mec030, valid};

const TOKEN: &str = "operator-token";

async fn mec(plmn: &str) -> MecHandle {
    let p: Plmn = plmn.parse().unwrap();
    start(ServeOptions::local(p, TOKEN, b"roaming secret"))
        .await
        .unwrap()
}

/// An HTTP callback receiver on loopback: notifications arrive on the channel.
async fn callback_sink() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/cb",
        post(move |axum::Json(v): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(v);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cb", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("the sink is open")
}

fn cell(m: &MecHandle) -> String {
    let l = m.mec.vis.location();
    l["ecgi"]["cellId"]["cellId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn v2x_api_authorizes_from_subscription_data() {
    let m = mec("001-01").await;
    let c = reqwest::Client::new();
    let url = m.url();
    // The operator API wants its token.
    let r = c
        .put(format!("{url}/v2x/v1/subscriptions/car-1"))
        .json(&json!({"services": [36], "plmns": [{"mcc": "002", "mnc": "02"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .put(format!("{url}/v2x/v1/subscriptions/car-1"))
        .bearer_auth(TOKEN)
        .json(
            &json!({"services": [36, 37], "plmns": [{"mcc": "002", "mnc": "02"}], "validityS": 60}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    let dev_token = p["deviceToken"].as_str().unwrap().to_owned();
    // A bad subscription is refused with a reason.
    let r = c
        .put(format!("{url}/v2x/v1/subscriptions/car-2"))
        .bearer_auth(TOKEN)
        .json(&json!({"services": [], "plmns": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["detail"].as_str().unwrap().contains("services"), "{e}");
    valid(&mec030(), "ProblemDetails", &e);

    // The device authorizes and gets parameters in the TS 24.588 shape.
    let auth = json!({"deviceId": "car-1", "pc5Address": "10.77.1.1"});
    let r = c
        .post(format!("{url}/v2x/v1/authorizations"))
        .bearer_auth(&dev_token)
        .json(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let cp: Value = r.json().await.unwrap();
    assert_eq!(cp["validityTimer"], 60);
    assert_eq!(
        cp["pc5Authorization"]["nr"],
        json!([{"mcc": "001", "mnc": "01"}, {"mcc": "002", "mnc": "02"}])
    );
    assert_eq!(cp["serviceToDestination"][0]["dstLayer2Id"], "0xFF0024");
    assert_eq!(cp["pc5Qos"][0]["pqi"], 23);
    assert_eq!(cp["linkKeys"].as_array().unwrap().len(), 2);
    // The same service's key at another operator of the agreement is the same key.
    let other = v2x::function::link_key(b"roaming secret", 36);
    assert_eq!(cp["linkKeys"][0]["key"], other.key);

    // Wrong credential, unknown device.
    let r = c
        .post(format!("{url}/v2x/v1/authorizations"))
        .bearer_auth("nope")
        .json(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{url}/v2x/v1/authorizations"))
        .bearer_auth(&dev_token)
        .json(&json!({"deviceId": "ghost", "pc5Address": "10.77.1.9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A link towards a PLMN that is not in the list is refused; towards one that is, opened.
    let link = |plmn: Value| json!({"deviceId": "car-1", "peerAddress": "10.77.2.1", "peerPlmn": plmn, "v2xServiceId": 36});
    let r = c
        .post(format!("{url}/v2x/v1/links"))
        .bearer_auth(&dev_token)
        .json(&link(json!({"mcc": "003", "mnc": "03"})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(e["detail"].as_str().unwrap().contains("003-03"), "{e}");
    let r = c
        .post(format!("{url}/v2x/v1/links"))
        .bearer_auth(&dev_token)
        .json(&link(json!({"mcc": "002", "mnc": "02"})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // The operator's console: the device authorized, its link, in one answer; not for a
    // device's token.
    let r = c
        .get(format!("{url}/v2x/v1/status"))
        .bearer_auth(&dev_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let st: v2x::types::MecStatus = c
        .get(format!("{url}/v2x/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st.operator.to_string(), "001-01");
    assert_eq!(st.devices.len(), 1);
    let d = &st.devices[0];
    assert_eq!(d.device_id, "car-1");
    assert_eq!(d.pc5_address, Some("10.77.1.1".parse().unwrap()));
    assert!(
        d.expires_in_s.is_some_and(|s| (55..=60).contains(&s)),
        "{d:?}"
    );
    assert_eq!(d.roaming_from, None);
    assert_eq!(st.links.len(), 1);
    assert_eq!(st.links[0].peer_address.to_string(), "10.77.2.1");

    // Revocation: the links go, the device can no longer authorize.
    let r = c
        .delete(format!("{url}/v2x/v1/subscriptions/car-1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(m.mec.function.links(None).is_empty());
    let r = c
        .post(format!("{url}/v2x/v1/authorizations"))
        .bearer_auth(&dev_token)
        .json(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn vis_queries_and_services_match_mec030() {
    let doc = mec030();
    let m = mec("001-01").await;
    let c = reqwest::Client::new();
    let vis = format!("{}/vis/v2", m.url());
    let cell = cell(&m);
    for (q, schema) in [
        ("uu_unicast_provisioning_info", "UuUnicastProvisioningInfo"),
        ("uu_mbms_provisioning_info", "UuMbmsProvisioningInfo"),
        ("pc5_provisioning_info", "Pc5ProvisioningInfo"),
    ] {
        let r = c
            .get(format!("{vis}/queries/{q}?location_info=ecgi,{cell}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{q}");
        valid(&doc, schema, &r.json().await.unwrap());
        let r = c
            .get(format!("{vis}/queries/{q}?location_info=ecgi,0000001"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{q} of a foreign cell");
        valid(&doc, "ProblemDetails", &r.json().await.unwrap());
        let r = c
            .get(format!("{vis}/queries/{q}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q} without location_info");
        let r = c
            .get(format!("{vis}/queries/{q}?location_info=ecgi,{cell}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{q} without a token");
    }
    let qos = json!({"locationGranularity": "100", "routes": [{"routeInfo": [
        {"location": {"geoArea": {"latitude": 48.85, "longitude": 2.35}}},
        {"location": {"geoArea": {"latitude": 48.9, "longitude": 2.4}}}]}]});
    valid(&doc, "PredictedQos", &qos);
    let r = c
        .post(format!("{vis}/provide_predicted_qos"))
        .bearer_auth(TOKEN)
        .json(&qos)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    valid(&doc, "PredictedQos", &p);
    let near = p["routes"][0]["routeInfo"][0]["rsrp"].as_u64().unwrap();
    let far = p["routes"][0]["routeInfo"][1]["rsrp"].as_u64().unwrap();
    assert!(
        near > far,
        "the point at the site is better served: {near} vs {far}"
    );

    let ask = json!({"locationInfo": [m.mec.vis.location()]});
    let r = c
        .post(format!("{vis}/provide_v2x_msg_distribution_server_info"))
        .bearer_auth(TOKEN)
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let d: Value = r.json().await.unwrap();
    valid(&doc, "V2xMsgDistributionServerInfo", &d);
    assert_eq!(
        d["v2xMsgDistributionServer"][0]["infoConnection"]["portNumber"],
        m.relay.port()
    );
}

#[tokio::test]
async fn vis_subscriptions_notify_by_callback_and_websocket() {
    let doc = mec030();
    let m = mec("001-01").await;
    let c = reqwest::Client::new();
    let vis = format!("{}/vis/v2", m.url());
    let (cb, mut rx) = callback_sink().await;

    // Callback subscription with a test notification; the document's msgType filter is a
    // list of strings.
    let sub = json!({"subscriptionType": "V2xMsgSubscription", "callbackReference": cb,
        "requestTestNotification": true,
        "filterCriteria": {"stdOrganization": "ETSI", "msgType": ["2"]}});
    let r = c
        .post(format!("{vis}/subscriptions"))
        .bearer_auth(TOKEN)
        .json(&sub)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let created: Value = r.json().await.unwrap();
    valid(&doc, "V2xMsgSubscription", &created);
    let href = created["_links"]["self"]["href"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = next(&mut rx).await;
    valid(&doc, "TestNotification", &t);
    assert_eq!(t["_links"]["subscription"]["href"], href);

    // Publish a CAM (msgType integer 2) and a DENM (1): only the CAM matches the filter.
    for t in [1, 2] {
        let r = c
            .post(format!("{vis}/publish_v2x_message"))
            .bearer_auth(TOKEN)
            .json(&json!({"stdOrganization": "ETSI", "msgType": t, "msgEncodeFormat": "base64", "msgContent": "AQID"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let n = next(&mut rx).await;
    valid(&doc, "V2xMsgNotification", &n);
    assert_eq!(n["msgType"], 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "the DENM did not match the filter"
    );
    // A msgType filter that is not a decimal message id is refused.
    let mut bad = sub.clone();
    bad["filterCriteria"]["msgType"] = json!(["cam"]);
    let r = c
        .post(format!("{vis}/subscriptions"))
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // GET, PUT with a stale ETag (412), PUT with the current one (new ETag).
    let r = c.get(&href).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    valid(&doc, "V2xMsgSubscription", &r.json().await.unwrap());
    let mut upd = created.clone();
    upd["filterCriteria"]["msgType"] = json!(["1", "2"]);
    let r = c
        .put(&href)
        .bearer_auth(TOKEN)
        .header("If-Match", "\"stale\"")
        .json(&upd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    valid(&doc, "ProblemDetails", &r.json().await.unwrap());
    let r = c
        .put(&href)
        .bearer_auth(TOKEN)
        .header("If-Match", &etag)
        .json(&upd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    valid(&doc, "V2xMsgSubscription", &r.json().await.unwrap());

    // WebSocket subscription (PC5 provisioning changes) and a PredQos one (accepted although
    // the document's POST oneOf omits it).
    let dst = "0xFF0024";
    let ws_sub = json!({"subscriptionType": "ProvChgPc5Subscription",
        "websockNotifConfig": {"requestWebsocketUri": true}, "requestTestNotification": true,
        "filterCriteria": {"locationInfo": m.mec.vis.location(), "dstLayer2Id": dst}});
    let r = c
        .post(format!("{vis}/subscriptions"))
        .bearer_auth(TOKEN)
        .json(&ws_sub)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    valid(&doc, "ProvChgPc5Subscription", &created);
    let uri = created["websockNotifConfig"]["websocketUri"]
        .as_str()
        .unwrap();
    let mut ws = WsClient::connect(uri).await.unwrap();
    let t: Value = serde_json::from_str(&ws.next_text().await.unwrap().unwrap()).unwrap();
    valid(&doc, "TestNotification", &t);
    let pq = json!({"subscriptionType": "PredQosSubscription", "callbackReference": cb,
        "filterCriteria": {"streamId": "s1"}, "expiryDeadline": {"seconds": 1, "nanoSeconds": 0}});
    let r = c
        .post(format!("{vis}/subscriptions"))
        .bearer_auth(TOKEN)
        .json(&pq)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pq_created: Value = r.json().await.unwrap();
    valid(&doc, "PredQosSubscription", &pq_created);

    // A device's link on dstLayer2Id 0xFF0024 goes down on revocation: the WebSocket hears it.
    let (p, _) = m
        .mec
        .function
        .provision(
            "car-9",
            serde_json::from_value(json!({"services": [36], "plmns": []})).unwrap(),
        )
        .await
        .unwrap();
    let req =
        serde_json::from_value(json!({"deviceId": "car-9", "pc5Address": "10.77.1.9"})).unwrap();
    m.mec
        .function
        .authorize(&p.device_token, &req, None)
        .await
        .unwrap();
    let lr = serde_json::from_value(json!({"deviceId": "car-9", "peerAddress": "10.77.1.8",
        "peerPlmn": {"mcc": "001", "mnc": "01"}, "v2xServiceId": 36}))
    .unwrap();
    m.mec
        .function
        .open_link(&p.device_token, &lr)
        .await
        .unwrap();
    m.mec.revoke("car-9").await.unwrap();
    let n: Value = serde_json::from_str(&ws.next_text().await.unwrap().unwrap()).unwrap();
    valid(&doc, "ProvChgPc5Notification", &n);
    assert_eq!(n["dstLayer2Id"], dst);

    // Listing (with the MEC 030 filter values); the expiry deadline in the past goes at the
    // next sweep.
    m.mec.sweep().await;
    let r = c
        .get(format!("{vis}/subscriptions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let l: Value = r.json().await.unwrap();
    valid(&doc, "SubscriptionLinkList", &l);
    let kinds: Vec<&str> = l["_links"]["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subscriptionType"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["V2xMsgSubscription", "ProvChgPc5Subscription"],
        "the PredQos one expired"
    );
    let r = c
        .get(format!(
            "{vis}/subscriptions?subscription_type=prov_chg_pc5"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let l: Value = r.json().await.unwrap();
    assert_eq!(l["_links"]["subscriptions"].as_array().unwrap().len(), 1);
    let r = c.delete(&href).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c.get(&href).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404);
    valid(&doc, "ProblemDetails", &r.json().await.unwrap());
}
