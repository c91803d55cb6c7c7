// A device on MQTT.js (the npm package `mqtt`, under Node) for
// tests/tests/websocket.rs: connects over ws:// or wss:// with a JWT,
// subscribes to its reply topic, publishes a command, and prints the reply
// it gets as one JSON line. Exits 0 on a reply, 1 on an error, 2 on timeout.
//
// node mqtt_client.mjs <url> <protocolVersion 4|5> <uid> <token> [ca file]
import mqtt from "mqtt";
import { readFileSync } from "node:fs";

const [url, version, uid, token, caFile] = process.argv.slice(2);
const replyTopic = `${uid}_contact_list`;
const options = {
  protocolVersion: Number(version),
  clientId: `${uid}-mqttjs-v${version}`,
  username: "JWT",
  password: token,
  reconnectPeriod: 0,
  connectTimeout: 10_000,
};
if (caFile) {
  options.ca = readFileSync(caFile);
  options.rejectUnauthorized = true;
}
const timer = setTimeout(() => {
  console.error("timed out");
  process.exit(2);
}, 15_000);
const client = mqtt.connect(url, options);
client.on("error", (e) => {
  console.error(`error: ${e.message}`);
  process.exit(1);
});
client.on("connect", async () => {
  try {
    await client.subscribeAsync(replyTopic, { qos: 1 });
    await client.publishAsync("get_contact_list", "{}", { qos: 1 });
  } catch (e) {
    console.error(`error: ${e.message}`);
    process.exit(1);
  }
});
client.on("message", (topic, payload, packet) => {
  const userId = packet.properties?.userProperties?.user_id ?? null;
  console.log(JSON.stringify({ topic, payload: payload.toString(), user_id: userId }));
  clearTimeout(timer);
  client.end(false, () => process.exit(0));
});
