//! Loymax: the document's example models published to a real topic exchange with their routing
//! keys, and the state read back through the read API.

use amqprs::{
    channel::{BasicPublishArguments, ExchangeDeleteArguments},
    BasicProperties,
};
use serde_json::Value;

use crate::helpers::{eventually, header, spawn_app, unique, Broker, TestApp};

/// The document's example models, verbatim (line numbers stripped), with their routing keys.
const REGISTRATION_BEGIN: &str = include_str!("../fixtures/loymax/registration_begin.json");
const REGISTRATION_FINISH: &str = include_str!("../fixtures/loymax/registration_finish.json");
const CARD_LINK: &str = include_str!("../fixtures/loymax/card_link_replace.json");
const MERGE: &str = include_str!("../fixtures/loymax/profile_merge.json");
const ACTIVATION: &str = include_str!("../fixtures/loymax/card_activation.json");
const BLOCK: &str = include_str!("../fixtures/loymax/card_block.json");
const DELETE: &str = include_str!("../fixtures/loymax/card_delete.json");
const CATEGORY: &str = include_str!("../fixtures/loymax/card_category.json");
const ATTRIBUTE: &str = include_str!("../fixtures/loymax/attribute_update.json");
const SUBSCRIPTION: &str = include_str!("../fixtures/loymax/subscription_update.json");
const PURCHASE: &str = include_str!("../fixtures/loymax/purchase_confirm.json");
const REFUND: &str = include_str!("../fixtures/loymax/purchase_refund.json");

const BEGIN_KEY: &str = "customer.registration.begin";
const FINISH_KEY: &str = "customer.registration.finish";
const LINK_KEY: &str = "customer.card.link";
const MERGE_KEY: &str = "customer.profile.merge";
const STATE_KEY: &str = "customer.card.changeState";
const BLOCK_KEY: &str = "customer.card.changeBlockState";
const DELETE_KEY: &str = "customer.card.changeDeleteState";
/// As the document prints it: with a Cyrillic `с` (U+0441).
const CATEGORY_KEY_CYRILLIC: &str = "\u{0441}ustomer.card.changeCategory";
const CATEGORY_KEY_LATIN: &str = "customer.card.changeCategory";
const ATTRIBUTE_KEY: &str = "customer.attribute.update";
const SUBSCRIPTION_KEY: &str = "customer.subscription.update";
const PURCHASE_KEY: &str = "purchases.confirm.modelUpdate";
const REFUND_KEY: &str = "purchases.refundModelUpdate";

/// An app consuming its own Loymax queue, bound to its own topic exchange.
struct Loymax {
    app: TestApp,
    broker: Broker,
    exchange: String,
    queue: String,
    barriers: u32,
}

async fn loymax_app() -> Loymax {
    loymax_app_with(&[]).await
}

async fn loymax_app_with(extra: &[(&str, &str)]) -> Loymax {
    let queue = unique("lmx");
    let exchange = unique("lmx-ex");
    let mut overrides = vec![
        ("loymax.enabled", "true"),
        ("loymax.queue", queue.as_str()),
        ("loymax.exchange", exchange.as_str()),
    ];
    overrides.extend_from_slice(extra);
    let app = spawn_app(&overrides).await;
    app.wait_ready().await;
    Loymax {
        app,
        broker: Broker::connect().await,
        exchange,
        queue,
        barriers: 0,
    }
}

fn props() -> BasicProperties {
    BasicProperties::default()
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id).finish()
}

fn at_second(secs: u64) -> BasicProperties {
    BasicProperties::default().with_timestamp(secs).finish()
}

impl Loymax {
    /// Publish one persistent message to the exchange with a routing key (committed).
    async fn publish(&self, routing_key: &str, body: &str, mut props: BasicProperties) {
        props.with_persistence(true);
        self.broker
            .channel
            .basic_publish(
                props,
                body.as_bytes().to_vec(),
                BasicPublishArguments::new(&self.exchange, routing_key),
            )
            .await
            .expect("publish");
        self.broker.channel.tx_commit().await.expect("tx.commit");
    }

    /// Publish a registration of a fresh member and wait until it is visible: everything
    /// published before it has been processed (one queue, handled in order).
    async fn barrier(&mut self) {
        self.barriers += 1;
        let id = format!("barrier-{}", self.barriers);
        let body = format!(
            r#"{{"eventCode":"OnBeginRegistration","customerInfo":{{"customerId":"{id}"}}}}"#
        );
        self.publish(BEGIN_KEY, &body, props()).await;
        self.get(&format!("/api/v1/loymax/members/{id}")).await;
    }

    /// GET that must answer 200 (polled until it does).
    async fn get(&self, path: &str) -> Value {
        eventually(15, path, || async {
            let (status, body) = self.app.get_json(path).await;
            (status == 200).then_some(body)
        })
        .await
    }

    async fn member(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/loymax/members/{id}")).await
    }

    async fn card(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/loymax/cards/{id}")).await
    }

    fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    async fn finish(self) {
        let dlq = self.dead_letter_queue();
        self.app.stop().await.unwrap();
        self.broker.delete_queues(&[self.queue, dlq]).await;
        let ch = self.broker.connection.open_channel(None).await.unwrap();
        let _ = ch
            .exchange_delete(ExchangeDeleteArguments::new(&self.exchange))
            .await;
        let _ = ch.close().await;
    }
}

fn text(v: &Value) -> String {
    v.to_string()
}

#[tokio::test]
async fn every_seed_example_published_with_its_routing_key_gives_the_documented_state() {
    let mut lmx = loymax_app().await;
    for (key, body) in [
        (BEGIN_KEY, REGISTRATION_BEGIN),
        (FINISH_KEY, REGISTRATION_FINISH),
        (LINK_KEY, CARD_LINK),
        (MERGE_KEY, MERGE),
        (STATE_KEY, ACTIVATION),
        (BLOCK_KEY, BLOCK),
        (DELETE_KEY, DELETE),
        (CATEGORY_KEY_CYRILLIC, CATEGORY),
        (ATTRIBUTE_KEY, ATTRIBUTE),
        (SUBSCRIPTION_KEY, SUBSCRIPTION),
        (PURCHASE_KEY, PURCHASE),
        (REFUND_KEY, REFUND),
    ] {
        lmx.publish(key, body, props()).await;
    }
    lmx.barrier().await;

    // Registration started and completed.
    let m = lmx.member("121").await;
    let state = &m["member"]["state"];
    assert_eq!(state["registration"]["status"], "completed");
    assert!(state["registration"]["started_at"].is_string());
    assert!(state["registration"]["completed_at"].is_string());
    assert_eq!(state["uid"], "aca52e1b-f08b-44a7-a77b-69ae0442ce7b");
    assert_eq!(state["account_group_id"], "125");
    assert_eq!(state["identifier_id"], 826);

    // Card replacement: new card 6 linked to member 11, old card 5 marked replaced, linked to 6.
    let new = lmx.card("6").await;
    let card = &new["card"]["state"];
    assert_eq!(card["member"], "11");
    assert_eq!(card["number"], "1664669457201226");
    assert_eq!(card["state"], "Activated");
    assert_eq!(card["category"], "VIP");
    assert_eq!(card["replaces"], "5");
    assert_eq!(card["link_type"], "ReplaceCard");
    assert_eq!(card["link_source"], "UserPortal");
    let old = lmx.card("3515656237264935").await;
    let card = &old["card"]["state"];
    assert_eq!(old["card"]["id"], "5");
    assert_eq!(card["state"], "Replaced");
    assert_eq!(card["replaced_by"], "6");
    assert_eq!(
        (card["blocked"].as_bool(), card["deleted"].as_bool()),
        (Some(true), Some(true))
    );

    // The merge (trailing comma and all): 13 merged into 11; a lookup of 13 leads to 11.
    let merged = lmx.member("13").await;
    assert_eq!(merged["customer_id"], "11");
    assert_eq!(merged["merge_chain"], serde_json::json!(["13", "11"]));
    assert_eq!(merged["merged_member"]["state"]["merged_into"], "11");
    let survivor = &merged["member"]["state"];
    assert_eq!(survivor["merged_from"], serde_json::json!(["13"]));
    assert_eq!(survivor["cards"], serde_json::json!(["6", "5"]));
    assert_eq!(merged["cards"].as_array().map(Vec::len), Some(2));

    // Activation.
    let activated = lmx.card("20").await;
    let card = &activated["card"]["state"];
    assert_eq!(card["state"], "Activated");
    assert_eq!(card["activation_date"], "2021-07-19T16:33:24Z");
    assert_eq!(card["member"], "24");

    // Block (by number too), delete, category with its history.
    let blocked = lmx.card("020000008").await;
    assert_eq!(blocked["card"]["id"], "13");
    assert_eq!(blocked["card"]["state"]["blocked"], true);
    assert_eq!(blocked["card"]["state"]["member"], "18");
    let deleted = lmx.card("39").await;
    let card = &deleted["card"]["state"];
    assert_eq!(card["deleted"], true);
    assert_eq!(card["category"], "VIP");
    let history = deleted["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["event"], "category_changed");
    assert_eq!(history[1]["changes"]["category"]["to"], "VIP");
    assert_eq!(
        lmx.member("42").await["member"]["state"]["cards"],
        serde_json::json!(["39"])
    );

    // Attribute: Phone = 79540286267 at changeDateTime, and the member's phone is known.
    let m = lmx.member("126").await;
    let state = &m["member"]["state"];
    assert_eq!(state["attributes"]["Phone"]["value"], "79540286267");
    assert_eq!(
        state["attributes"]["Phone"]["at"],
        "2021-06-15T09:17:07.000Z"
    );
    assert_eq!(state["attributes"]["Phone"]["attribute_type"], "Notifier");
    assert_eq!(state["addresses"]["phone"]["normalised"], "+79540286267");
    assert_eq!(state["uid"], "155b341e-f24c-4dd4-b105-ab58ce766a24");

    // Subscription: every channel of the Cashback mailing type; mail and sms pending (no
    // address known yet).
    let m = lmx.member("164").await;
    let state = &m["member"]["state"];
    let channels = &state["subscriptions"]["Cashback"]["channels"];
    for channel in ["mail", "push", "sms", "viber", "chatBot", "socialNetworks"] {
        assert_eq!(channels[channel], "Enabled", "{channel}");
    }
    assert_eq!(
        state["subscriptions"]["Cashback"]["type_code"],
        "DiscountOperation"
    );
    assert_eq!(state["consent"]["email"]["state"], "opted_in");
    assert_eq!(state["consent"]["email"]["pending"], true);
    assert_eq!(state["consent"]["sms"]["pending"], true);

    // Purchase and refund: exact amounts, texts intact, totals net of the refund.
    let m = lmx.member("107").await;
    assert_eq!(text(&m["purchases"]["count"]), "1");
    assert_eq!(text(&m["purchases"]["amount"]), "135.0000");
    assert_eq!(text(&m["purchases"]["refunded_amount"]), "100.0000");
    assert_eq!(text(&m["purchases"]["net_amount"]), "35.0000");
    assert_eq!(m["member"]["state"]["account_group_id"], "111");
    let p = lmx.get("/api/v1/loymax/members/107/purchases").await;
    let purchase = &p["purchases"][0];
    assert_eq!(purchase["id"], "512");
    assert_eq!(purchase["refund_ids"], serde_json::json!(["513"]));
    let doc = &purchase["state"];
    assert_eq!(text(&doc["amount"]), "135.0000");
    assert_eq!(doc["items"][1]["description"], "Вода");
    assert_eq!(text(&doc["withdraws"][0]["positionInfo"]["1"]), "-6.6700");
    assert_eq!(text(&doc["rewards"][1]["amount"]), "62.5100");
    assert_eq!(doc["cheque_number"], "123");
    assert_eq!(doc["date_time"], "2020-08-13T16:53:47Z");
    let refund = &p["refunds"][0];
    assert_eq!(refund["id"], "513");
    assert_eq!(refund["state"]["refunded_purchase"]["purchase_id"], "512");
    assert_eq!(
        refund["state"]["currency"],
        "718ae69b-76be-413f-ad19-7b7e02e4a438"
    );
    assert_eq!(text(&refund["state"]["amount"]), "100.0000");

    // The raw payload is kept as received: the merge with its trailing comma.
    let event = merged["merged_member"]["changed_by_event"]
        .as_i64()
        .unwrap();
    let inbox = lmx.get(&format!("/api/v1/inbox/{event}")).await;
    assert_eq!(inbox["raw"]["text"], MERGE);
    assert_eq!(inbox["kind"], "member.merged");
    assert_eq!(inbox["meta"]["routing_key"], MERGE_KEY);
    assert_eq!(
        inbox["meta"]["loymax"]["flags"],
        serde_json::json!(["lenient_json"])
    );
    assert_eq!(lmx.broker.message_count(&lmx.dead_letter_queue()).await, 0);
    lmx.finish().await;
}

fn link(customer: &str, link_type: &str, new: u32, old: Option<u32>) -> String {
    let old = old.map_or("null".to_owned(), |c| {
        format!(r#"{{"cardId":{c},"cardNumber":"N{c}","cardState":"Activated"}}"#)
    });
    format!(
        r#"{{"newCard":{{"cardId":{new},"cardNumber":"N{new}","cardState":"Activated"}},"oldCard":{old},
            "linkSource":"UserPortal","linkCardType":"{link_type}","customerInfo":{{"customerId":{customer}}},
            "eventCode":"{}"}}"#,
        if link_type == "ReplaceCard" {
            "OnCardReplace"
        } else {
            link_type
        }
    )
}

#[tokio::test]
async fn a_replace_chain_links_each_card_to_its_successor() {
    let mut lmx = loymax_app().await;
    lmx.publish(LINK_KEY, &link("7", "SetCard", 1, None), props())
        .await;
    lmx.publish(LINK_KEY, &link("7", "ReplaceCard", 2, Some(1)), props())
        .await;
    lmx.publish(LINK_KEY, &link("7", "ReplaceCard", 3, Some(2)), props())
        .await;
    lmx.barrier().await;

    let m = lmx.member("7").await;
    assert_eq!(
        m["member"]["state"]["cards"],
        serde_json::json!(["1", "2", "3"])
    );
    let first = lmx.card("1").await;
    assert_eq!(first["card"]["state"]["state"], "Replaced");
    assert_eq!(first["card"]["state"]["replaced_by"], "2");
    let middle = lmx.card("N2").await;
    assert_eq!(middle["card"]["state"]["replaces"], "1");
    assert_eq!(middle["card"]["state"]["replaced_by"], "3");
    assert_eq!(middle["card"]["state"]["state"], "Replaced");
    let last = lmx.card("3").await;
    assert_eq!(last["card"]["state"]["replaces"], "2");
    assert_eq!(last["card"]["state"]["state"], "Activated");
    assert!(last["card"]["state"]["replaced_by"].is_null());
    lmx.finish().await;
}

fn block(state: bool) -> String {
    BLOCK
        .replace(
            "\"targetBlockState\": true",
            &format!("\"targetBlockState\": {state}"),
        )
        .replace(
            "\"externalId\": \"73d812984ef44a9fb7f1200a41ac7aba\",\n",
            "",
        )
}

fn delete(state: bool) -> String {
    DELETE.replace(
        "\"targetDeleteState\":true",
        &format!("\"targetDeleteState\":{state}"),
    )
}

#[tokio::test]
async fn block_unblock_delete_restore_set_the_card_flags_in_arrival_order() {
    let mut lmx = loymax_app().await;
    assert!(block(false).contains("\"targetBlockState\": false"));
    assert!(!block(true).contains("externalId"));
    // No message-id, no externalId: the same bytes again after an unblock block again.
    for state in [true, false, true] {
        lmx.publish(BLOCK_KEY, &block(state), props()).await;
    }
    lmx.barrier().await;
    let card = lmx.card("13").await;
    assert_eq!(card["card"]["state"]["blocked"], true);
    let events: Vec<&Value> = card["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["changes"]["blocked"]["to"])
        .collect();
    assert_eq!(
        events,
        [&Value::Bool(true), &Value::Bool(false), &Value::Bool(true)]
    );

    lmx.publish(BLOCK_KEY, &block(false), with_id("unblock-2"))
        .await;
    lmx.publish(DELETE_KEY, &delete(true), props()).await;
    lmx.barrier().await;
    let card = lmx.card("39").await;
    assert_eq!(card["card"]["state"]["deleted"], true);
    lmx.publish(DELETE_KEY, &delete(false), props()).await;
    lmx.barrier().await;
    let card = lmx.card("39").await;
    assert_eq!(card["card"]["state"]["deleted"], false);
    assert_eq!(card["history"].as_array().map(Vec::len), Some(2));
    assert_eq!(lmx.card("13").await["card"]["state"]["blocked"], false);
    lmx.finish().await;
}

#[tokio::test]
async fn out_of_order_card_state_is_ordered_by_the_amqp_timestamp() {
    let mut lmx = loymax_app().await;
    lmx.publish(BLOCK_KEY, &block(true), at_second(1_700_000_200))
        .await;
    // Older, delivered later: recorded, not applied.
    lmx.publish(BLOCK_KEY, &block(false), at_second(1_700_000_100))
        .await;
    lmx.barrier().await;
    let card = lmx.card("13").await;
    assert_eq!(card["card"]["state"]["blocked"], true);
    assert_eq!(
        card["card"]["state"]["times"]["blocked"],
        "2023-11-14T22:16:40.000Z"
    );
    let store = lmx.app.store();
    let stale = store.inbox_event(2).unwrap().unwrap();
    assert_eq!(
        (stale.kind.as_str(), stale.outcome.as_str()),
        ("card.unblocked", "stale")
    );

    lmx.publish(BLOCK_KEY, &block(false), at_second(1_700_000_300))
        .await;
    lmx.barrier().await;
    assert_eq!(lmx.card("13").await["card"]["state"]["blocked"], false);
    lmx.finish().await;
}

fn purchase_for(customer: &str, purchase_id: u32, amount: &str) -> String {
    PURCHASE
        .replace("\"customerId\":107", &format!("\"customerId\":{customer}"))
        .replace(
            "\"purchaseId\":512",
            &format!("\"purchaseId\":{purchase_id}"),
        )
        .replace("\"amount\":135.0000", &format!("\"amount\":{amount}"))
}

#[tokio::test]
async fn merge_moves_cards_and_totals_and_lookups_of_the_merged_member_lead_to_the_survivor() {
    let mut lmx = loymax_app().await;
    lmx.publish(LINK_KEY, &link("13", "SetCard", 70, None), props())
        .await;
    lmx.publish(PURCHASE_KEY, &purchase_for("13", 900, "10.50"), props())
        .await;
    lmx.publish(LINK_KEY, &link("11", "SetCard", 71, None), props())
        .await;
    lmx.publish(MERGE_KEY, MERGE, props()).await;
    // After the merge, events naming the merged profile land on the survivor.
    lmx.publish(PURCHASE_KEY, &purchase_for("13", 901, "0.25"), props())
        .await;
    lmx.barrier().await;

    let m = lmx.member("13").await;
    assert_eq!(m["customer_id"], "11");
    assert_eq!(
        m["member"]["state"]["cards"],
        serde_json::json!(["71", "70"])
    );
    assert_eq!(m["merged_member"]["state"]["cards"], serde_json::json!([]));
    assert_eq!(text(&m["purchases"]["count"]), "2");
    assert_eq!(text(&m["purchases"]["net_amount"]), "10.75");
    let card = lmx.card("70").await;
    assert_eq!(card["card"]["state"]["member"], "11");
    assert_eq!(card["history"][1]["event"], "merged");
    let p = lmx.get("/api/v1/loymax/members/13/purchases").await;
    let ids: Vec<&Value> = p["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["id"])
        .collect();
    assert_eq!(ids, ["900", "901"]);

    // The same merge again (another message id: it slipped past the dedupe key) changes nothing.
    let version = m["member"]["version"].clone();
    lmx.publish(MERGE_KEY, MERGE, with_id("merge-again")).await;
    lmx.barrier().await;
    assert_eq!(lmx.member("11").await["member"]["version"], version);
    lmx.finish().await;
}

fn email(customer: &str, address: &str) -> String {
    ATTRIBUTE
        .replace("\"attributeCode\":\"Phone\"", "\"attributeCode\":\"Email\"")
        .replace(
            "\"newValue\":\"79540286267\"",
            &format!("\"newValue\":\"{address}\""),
        )
        .replace("\"customerId\":126", &format!("\"customerId\":{customer}"))
        .replace(
            "5c4b232b-aa2d-4bff-b393-9f60b9b8c1f1",
            &format!("activity-{customer}-{address}"),
        )
}

fn mail(state: &str) -> String {
    SUBSCRIPTION.replace("\"mail\":\"Enabled\"", &format!("\"mail\":\"{state}\""))
}

fn consent_state(lmx: &Loymax, key: &str) -> Option<String> {
    let record = lmx.app.store().get_record("consent", key).unwrap()?;
    record.doc["state"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn mail_disabled_before_the_email_is_known_is_applied_when_it_becomes_known() {
    let mut lmx = loymax_app().await;
    lmx.publish(SUBSCRIPTION_KEY, &mail("Disabled"), props())
        .await;
    lmx.barrier().await;
    let m = lmx.member("164").await;
    assert_eq!(
        m["member"]["state"]["consent"]["email"]["state"],
        "opted_out"
    );
    assert_eq!(m["member"]["state"]["consent"]["email"]["pending"], true);
    assert_eq!(consent_state(&lmx, "email:later@example.ru"), None);

    lmx.publish(ATTRIBUTE_KEY, &email("164", "Later@Example.ru"), props())
        .await;
    lmx.barrier().await;
    let m = lmx.member("164").await;
    assert_eq!(m["member"]["state"]["consent"]["email"]["pending"], false);
    assert_eq!(
        m["member"]["state"]["addresses"]["email"]["as_sent"],
        "Later@Example.ru"
    );
    assert_eq!(
        consent_state(&lmx, "email:later@example.ru").as_deref(),
        Some("opted_out")
    );
    // sms was Enabled with no phone known: still pending, nothing in the ledger.
    assert_eq!(m["member"]["state"]["consent"]["sms"]["pending"], true);
    lmx.finish().await;
}

#[tokio::test]
async fn mail_disabled_after_the_email_is_known_goes_to_the_ledger_at_once() {
    let mut lmx = loymax_app().await;
    lmx.publish(ATTRIBUTE_KEY, &email("164", "known@example.ru"), props())
        .await;
    lmx.publish(SUBSCRIPTION_KEY, &mail("Enabled"), props())
        .await;
    lmx.barrier().await;
    assert_eq!(
        consent_state(&lmx, "email:known@example.ru").as_deref(),
        Some("opted_in")
    );
    lmx.publish(SUBSCRIPTION_KEY, &mail("Disabled"), props())
        .await;
    lmx.barrier().await;
    assert_eq!(
        consent_state(&lmx, "email:known@example.ru").as_deref(),
        Some("opted_out")
    );
    let history = lmx
        .app
        .store()
        .history("consent.change", "email:known@example.ru", 10)
        .unwrap();
    let states: Vec<&str> = history
        .iter()
        .filter_map(|h| h.doc["state"].as_str())
        .collect();
    assert_eq!(states, ["opted_in", "opted_out"]);
    assert!(history.iter().all(|h| h.doc["source"] == "loymax"));
    let m = lmx.member("164").await;
    assert_eq!(m["member"]["state"]["consent"]["email"]["pending"], false);
    assert_eq!(
        m["member"]["state"]["subscriptions"]["Cashback"]["channels"]["mail"],
        "Disabled"
    );
    lmx.finish().await;
}

#[tokio::test]
async fn a_loymax_opt_out_reaches_emarsys_as_opt_out() {
    let emarsys = crate::consent_truth::Emarsys::start().await;
    let list = format!("[{}]", emarsys.destination(""));
    let mut lmx = loymax_app_with(&[
        ("delivery.poll_interval", "20ms"),
        ("destinations", list.as_str()),
    ])
    .await;
    lmx.publish(ATTRIBUTE_KEY, &email("164", "Member@Example.ru"), props())
        .await;
    lmx.publish(SUBSCRIPTION_KEY, &mail("Enabled"), at_second(1_700_000_000))
        .await;
    lmx.barrier().await;
    eventually(20, "Emarsys hears the opt-in", || async {
        (emarsys.opt_in_field("member@example.ru").as_deref() == Some("1")).then_some(())
    })
    .await;
    lmx.publish(
        SUBSCRIPTION_KEY,
        &mail("Disabled"),
        at_second(1_700_000_100),
    )
    .await;
    lmx.barrier().await;
    eventually(20, "Emarsys hears the opt-out", || async {
        (emarsys.opt_in_field("member@example.ru").as_deref() == Some("2")).then_some(())
    })
    .await;
    assert_eq!(
        consent_state(&lmx, "email:member@example.ru").as_deref(),
        Some("opted_out")
    );
    let rows = lmx
        .app
        .store()
        .list_deliveries(&subgate::store::DeliveryFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert!(
        rows.iter().all(|r| r.entity.starts_with("loymax:member:")),
        "{rows:?}"
    );
    lmx.finish().await;
}

#[tokio::test]
async fn a_refund_after_its_purchase_nets_the_totals_and_a_redelivered_refund_counts_once() {
    let mut lmx = loymax_app().await;
    lmx.publish(PURCHASE_KEY, PURCHASE, props()).await;
    lmx.publish(REFUND_KEY, REFUND, props()).await;
    // Redelivered: the same bytes (deduped by the refund's purchase id), and under a new
    // message id (past the dedupe key: the refund record makes it a no-op).
    lmx.publish(REFUND_KEY, REFUND, props()).await;
    lmx.publish(REFUND_KEY, REFUND, with_id("refund-again"))
        .await;
    lmx.publish(PURCHASE_KEY, PURCHASE, with_id("purchase-again"))
        .await;
    lmx.barrier().await;

    let m = lmx.member("107").await;
    assert_eq!(text(&m["purchases"]["count"]), "1");
    assert_eq!(text(&m["purchases"]["refunds"]), "1");
    assert_eq!(text(&m["purchases"]["net_amount"]), "35.0000");
    let p = lmx.get("/api/v1/loymax/members/107/purchases").await;
    assert_eq!(p["purchases"].as_array().map(Vec::len), Some(1));
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(1));
    // Four purchase/refund messages were new to the inbox (two had a new message id); one was
    // a duplicate by key; plus the barrier.
    let stats = lmx.app.store().inbox_stats(Some("loymax")).unwrap();
    assert_eq!(stats.events, 5);
    lmx.finish().await;
}

#[tokio::test]
async fn duplicates_by_message_id_external_id_and_activity_uid_are_stored_once() {
    let mut lmx = loymax_app().await;
    for _ in 0..2 {
        lmx.publish(BEGIN_KEY, REGISTRATION_BEGIN, with_id("reg-1"))
            .await;
        lmx.publish(BLOCK_KEY, BLOCK, props()).await; // externalId
        lmx.publish(ATTRIBUTE_KEY, ATTRIBUTE, props()).await; // activityUid
    }
    lmx.barrier().await;
    let store = lmx.app.store();
    assert_eq!(store.inbox_stats(Some("loymax")).unwrap().events, 4);
    for (id, key) in [
        (1, "loymax:msg:reg-1"),
        (2, "loymax:ext:73d812984ef44a9fb7f1200a41ac7aba"),
        (3, "loymax:activity:5c4b232b-aa2d-4bff-b393-9f60b9b8c1f1"),
    ] {
        assert_eq!(store.inbox_event(id).unwrap().unwrap().dedupe_key, key);
    }
    assert_eq!(lmx.member("126").await["member"]["version"], 1);
    lmx.finish().await;
}

#[tokio::test]
async fn an_unknown_event_code_is_stored_and_counted_never_dead_lettered() {
    let mut lmx = loymax_app().await;
    let body =
        r#"{"eventCode":"OnTargetAudienceRecalculated","customerInfo":{"customerId":5},"x":[1,]}"#;
    lmx.publish(BEGIN_KEY, body, props()).await;
    lmx.barrier().await;
    let event = lmx.get("/api/v1/inbox/1").await;
    assert_eq!(event["kind"], "unknown");
    assert_eq!(event["outcome"], "noop");
    assert_eq!(event["entity"], "5");
    assert_eq!(event["raw"]["text"], body);
    assert_eq!(
        event["meta"]["loymax"]["event_code"],
        "OnTargetAudienceRecalculated"
    );
    assert_eq!(lmx.broker.message_count(&lmx.dead_letter_queue()).await, 0);
    // Nothing was made of it.
    let (status, _) = lmx.app.get_json("/api/v1/loymax/members/5").await;
    assert_eq!(status, 404);
    let metrics = lmx
        .app
        .http
        .get(lmx.app.url("/metrics"))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("subgate_loymax_unknown_events_total"),
        "{metrics}"
    );
    lmx.finish().await;
}

#[tokio::test]
async fn both_spellings_of_the_card_category_key_are_bound() {
    let mut lmx = loymax_app().await;
    lmx.publish(CATEGORY_KEY_CYRILLIC, CATEGORY, props()).await;
    // Latin spelling, and no eventCode: the routing key names the event.
    let gold = CATEGORY
        .replace(
            "\"newcardCategory\":\"VIP\"",
            "\"newcardCategory\":\"Gold\"",
        )
        .replace(",\n\"eventCode\":\"OnChangeCategoryCard\"", "");
    assert!(!gold.contains("eventCode"));
    lmx.publish(CATEGORY_KEY_LATIN, &gold, props()).await;
    lmx.barrier().await;
    let card = lmx.card("39").await;
    assert_eq!(card["card"]["state"]["category"], "Gold");
    let categories: Vec<&Value> = card["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["changes"]["category"]["to"])
        .collect();
    assert_eq!(categories, ["VIP", "Gold"]);
    let second = lmx.get("/api/v1/inbox/2").await;
    assert_eq!(second["meta"]["routing_key"], CATEGORY_KEY_LATIN);
    assert!(second["meta"]["loymax"]["event_code"].is_null());
    lmx.finish().await;
}

#[tokio::test]
async fn undecodable_bodies_are_dead_lettered_with_their_reason() {
    let mut lmx = loymax_app().await;
    for body in [
        "not json {",
        "[1, 2]",
        r#"{"eventCode":"OnBeginRegistration","customerInfo":{"customerId":null}}"#,
    ] {
        lmx.publish(BEGIN_KEY, body, props()).await;
    }
    // The next good message is still processed.
    lmx.barrier().await;
    let dlq = lmx.dead_letter_queue();
    eventually(15, "three dead letters", || async {
        (lmx.broker.message_count(&dlq).await == 3).then_some(())
    })
    .await;
    for (code, body) in [
        ("not_json", "not json {"),
        ("not_an_object", "[1, 2]"),
        ("missing_member", "OnBeginRegistration"),
    ] {
        let (props, got) = lmx.broker.get(&dlq).await.expect("a dead letter");
        let reason = header(&props, "x-subgate-error").unwrap_or_default();
        assert!(reason.starts_with(&format!("{code}: ")), "{reason}");
        assert_eq!(
            header(&props, "x-subgate-error-code").as_deref(),
            Some(code)
        );
        assert_eq!(
            header(&props, "x-subgate-routing-key").as_deref(),
            Some(BEGIN_KEY)
        );
        assert!(String::from_utf8_lossy(&got).contains(body));
    }
    lmx.finish().await;
}

#[tokio::test]
async fn with_declare_false_a_missing_topology_is_reported_not_created() {
    let queue = unique("lmx");
    let exchange = unique("lmx-ex");
    let app = spawn_app(&[
        ("loymax.enabled", "true"),
        ("loymax.declare", "false"),
        ("loymax.queue", queue.as_str()),
        ("loymax.exchange", exchange.as_str()),
    ])
    .await;
    let reasons = eventually(15, "a not-ready reason", || async {
        let (status, body) = app.get_json("/readyz").await;
        let reasons = body["reasons"].to_string();
        (status == 503 && reasons.contains("not found")).then_some(reasons)
    })
    .await;
    assert!(reasons.contains(&queue), "{reasons}");
    app.stop().await.unwrap();
    // Nothing was declared.
    let broker = Broker::connect().await;
    let ch = broker.connection.open_channel(None).await.unwrap();
    let passive = ch
        .queue_declare(
            amqprs::channel::QueueDeclareArguments::new(&queue)
                .passive(true)
                .finish(),
        )
        .await;
    assert!(passive.is_err());
}

#[tokio::test]
async fn unknown_loymax_ids_answer_404_and_the_routes_are_documented() {
    let app = spawn_app(&[]).await;
    for path in [
        "/api/v1/loymax/members/nope",
        "/api/v1/loymax/members/nope/purchases",
        "/api/v1/loymax/cards/nope",
    ] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let (_, doc) = app.get_json("/openapi.json").await;
    for path in [
        "/api/v1/loymax/members/{id}",
        "/api/v1/loymax/members/{id}/purchases",
        "/api/v1/loymax/cards/{id}",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    app.stop().await.unwrap();
}
