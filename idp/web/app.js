// The sign-up page: phone number and SMS code against this identity service
// (same origin), then MQTT.js over WebSocket to the broker with the issued
// token (username `JWT`), the built-in commands (`get_contact_list`, `sync`)
// and the pairing flow (`sync_session`, `sync_session_confirm`).
//
// The token lives in this page's memory only: a reload signs out.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);

  const state = {
    mqttUrl: null,    // from /app/config.json
    session: null,    // the sign-up session token (Bearer)
    token: null,      // the device token (MQTT password)
    uid: null,
    client: null,     // the MQTT.js client
    syncKey: null,    // the RSA-OAEP key pair this browser synced with
    countdown: null,  // the pairing code's timer
    configLoaded: null, // the promise of loadConfig()
  };

  // ---- messages on the page ------------------------------------------------
  function showError(message) {
    const box = $('error');
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $('error').hidden = true;
    $('error').textContent = '';
  }

  function setStatus(text, ok) {
    const el = $('mqtt-status');
    el.textContent = text;
    el.className = 'status ' + (ok === true ? 'ok' : ok === false ? 'bad' : '');
  }

  // ---- the identity service ------------------------------------------------
  // POSTs JSON; resolves to the answer's JSON, or throws an Error whose
  // message is the service's `error` (or why it could not be reached).
  async function post(path, body, bearer) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (bearer) headers['Authorization'] = 'Bearer ' + bearer;
    let response;
    try {
      response = await fetch(path, {
        method: 'POST',
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new Error('The identity service cannot be reached: ' + e.message);
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (e) {
      answer = null;
    }
    if (!response.ok) {
      const why = answer && answer.error ? answer.error : 'HTTP ' + response.status;
      throw new Error(why + ' (HTTP ' + response.status + ')');
    }
    return answer || {};
  }

  async function loadConfig() {
    try {
      const response = await fetch('config.json', { cache: 'no-store' });
      const config = await response.json();
      state.mqttUrl = config.mqtt_url || null;
    } catch (e) {
      state.mqttUrl = null;
    }
  }

  // ---- sign-up -------------------------------------------------------------
  async function sendCode(event) {
    event.preventDefault();
    clearError();
    const msisdn = $('msisdn').value.trim();
    $('send-code').disabled = true;
    try {
      const registered = await post('/register', { msisdn });
      state.session = registered.session_token;
      const sent = await post('/sms/verify', undefined, state.session);
      $('code-sent').textContent = 'A code was sent to ' + msisdn +
        (sent.msisdn ? ' from ' + sent.msisdn : '') + '.';
      $('number-form').hidden = true;
      $('code-form').hidden = false;
      $('code').focus();
    } catch (e) {
      showError('Could not send a code: ' + e.message);
    } finally {
      $('send-code').disabled = false;
    }
  }

  async function resendCode() {
    clearError();
    try {
      await post('/sms/resend_code', undefined, state.session);
      $('code-sent').textContent = 'Another code was sent.';
    } catch (e) {
      showError('Could not send another code: ' + e.message);
    }
  }

  async function verifyCode(event) {
    event.preventDefault();
    clearError();
    const code = $('code').value.trim();
    if (!/^[0-9]{6}$/.test(code)) {
      showError('The code is the 6 digits of the SMS.');
      return;
    }
    $('verify').disabled = true;
    try {
      const verified = await post('/sms/verify_code', { code }, state.session);
      state.token = verified.token;
      state.uid = verified.user_id;
      $('signup').hidden = true;
      $('account').hidden = false;
      $('user-id').textContent = state.uid;
      await state.configLoaded;
      connect();
    } catch (e) {
      showError('The code was not accepted: ' + e.message);
    } finally {
      $('verify').disabled = false;
    }
  }

  // ---- MQTT ----------------------------------------------------------------
  // CONNACK and DISCONNECT reason codes a person can act on.
  // (1-5 are MQTT 3.1.1's CONNACK codes.)
  const REASONS = {
    0x01: 'the broker does not speak this MQTT version',
    0x04: 'the broker refused the token',
    0x05: 'the broker refused the token (not authorized)',
    0x84: 'the broker does not speak this MQTT version',
    0x85: 'the broker refused this client id',
    0x86: 'the broker refused the token (bad user name or password)',
    0x87: 'the broker refused the token (not authorized: expired, revoked or from another issuer)',
    0x88: 'the broker is unavailable',
    0x89: 'the broker is busy; try again later',
    0x8b: 'the broker is shutting down',
    0x8e: 'this account signed in elsewhere with the same client id',
    0x97: 'a quota was exceeded',
    0x98: 'the account was revoked or deleted',
    0x9c: 'use another server',
    0x9d: 'the server moved',
  };

  function reason(code) {
    return REASONS[code] || 'reason code 0x' + Number(code).toString(16);
  }

  function topic(name) {
    return state.uid + '_' + name;
  }

  function command(name, body) {
    if (!state.client || !state.client.connected) {
      showError('Not connected to the broker.');
      return;
    }
    state.client.publish(name, JSON.stringify(body), { qos: 1 }, (err) => {
      if (err) showError('Could not send ' + name + ': ' + err.message);
    });
  }

  function connect() {
    if (!state.mqttUrl) {
      setStatus('no broker URL', false);
      showError('This service was started without the broker\'s WebSocket URL ' +
        '(IDP_WEB_MQTT_URL, or BROKER_WSS_LISTEN on the broker): the page cannot reach MQTT.');
      return;
    }
    if (typeof mqtt === 'undefined') {
      showError('MQTT.js did not load (vendor/mqtt.min.js).');
      return;
    }
    setStatus('connecting to ' + state.mqttUrl + '…');
    const client = mqtt.connect(state.mqttUrl, {
      username: 'JWT',
      password: state.token,
      clientId: 'web-' + Math.random().toString(16).slice(2, 12),
      protocolVersion: 5,
      clean: true,
      keepalive: 30,
      connectTimeout: 10000,
      reconnectPeriod: 5000,
    });
    state.client = client;
    let everConnected = false;
    client.on('connect', () => {
      everConnected = true;
      clearError();
      setStatus('connected', true);
      const topics = ['contact_list', 'sync', 'sync_session', 'sync_session_confirm'].map(topic);
      client.subscribe(topics, { qos: 1 }, (err, granted) => {
        if (err) {
          showError('Could not subscribe to the replies: ' + err.message);
          return;
        }
        const refused = (granted || []).filter((g) => g.qos >= 0x80);
        if (refused.length > 0) {
          showError('The broker refused the subscription to ' + refused[0].topic);
          return;
        }
        $('refresh-contacts').disabled = false;
        $('sync').disabled = false;
        $('pair-start').disabled = false;
        refreshContacts();
      });
    });
    client.on('message', onMessage);
    client.on('error', (err) => {
      if (err && typeof err.code === 'number') {
        setStatus('refused', false);
        showError('The broker refused the connection: ' + reason(err.code) + '.');
        client.end(true);
      } else {
        setStatus('error', false);
        showError('MQTT error: ' + (err && err.message ? err.message : err) +
          ' (is ' + state.mqttUrl + ' reachable, and its certificate trusted by this browser?)');
      }
    });
    client.on('disconnect', (packet) => {
      setStatus('disconnected', false);
      showError('The broker ended the session: ' + reason(packet.reasonCode) + '.');
    });
    client.on('offline', () => {
      setStatus('offline, retrying…', false);
    });
    client.on('close', () => {
      if ($('mqtt-status').textContent === 'refused') return;
      if (!everConnected) {
        showError('The broker cannot be reached at ' + state.mqttUrl +
          ': is it running, and does this browser trust its certificate? Retrying every 5 s.');
      } else if ($('error').hidden) {
        showError('The connection to the broker was lost; retrying every 5 s.');
      }
    });
  }

  function onMessage(received, payload) {
    let body;
    try {
      body = JSON.parse(new TextDecoder().decode(payload));
    } catch (e) {
      showError('A reply on ' + received + ' was not JSON.');
      return;
    }
    switch (received) {
      case topic('contact_list'): return showContacts(body);
      case topic('sync'): return onSync(body);
      case topic('sync_session'): return onPairing(body);
      case topic('sync_session_confirm'): return onPairing(body);
      default: return undefined;
    }
  }

  // ---- contacts -------------------------------------------------------------
  function refreshContacts() {
    $('contacts-status').textContent = 'Asking the broker for your contacts…';
    command('get_contact_list', {});
  }

  function showContacts(body) {
    if (body.status && body.status >= 400) {
      $('contacts-status').textContent = 'The contact list is unavailable: ' + body.error;
      return;
    }
    const list = $('contacts');
    list.replaceChildren();
    const contacts = Array.isArray(body.contacts) ? body.contacts : [];
    for (const contact of contacts) {
      const item = document.createElement('li');
      item.textContent = contact;
      list.appendChild(item);
    }
    $('contacts-status').textContent = contacts.length === 0
      ? 'No contacts yet.'
      : contacts.length + (contacts.length === 1 ? ' contact:' : ' contacts:');
  }

  // ---- sync -----------------------------------------------------------------
  function b64(bytes) {
    let text = '';
    for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
    return btoa(text);
  }

  function unb64(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  async function startSync() {
    clearError();
    if (!window.crypto || !crypto.subtle) {
      showError('Sync needs the Web Crypto API, which browsers offer only on https:// pages (or http://localhost).');
      return;
    }
    $('sync').disabled = true;
    $('sync-status').textContent = 'Making a key and asking for a sync…';
    try {
      state.syncKey = await crypto.subtle.generateKey(
        { name: 'RSA-OAEP', modulusLength: 2048, publicExponent: new Uint8Array([1, 0, 1]), hash: 'SHA-256' },
        false,
        ['encrypt', 'decrypt'],
      );
      const spki = await crypto.subtle.exportKey('spki', state.syncKey.publicKey);
      command('sync', { public_key: b64(spki) });
    } catch (e) {
      showError('Could not make a sync key: ' + e.message);
      $('sync').disabled = false;
    }
  }

  async function onSync(body) {
    $('sync').disabled = false;
    if (body.status !== 200) {
      $('sync-status').textContent = 'Sync failed.';
      showError('Sync failed: ' + (body.error || 'status ' + body.status));
      return;
    }
    try {
      const encrypted = unb64(body.encrypted_key);
      const server = await crypto.subtle.importKey(
        'spki', unb64(body.server_public_key), { name: 'RSA-PSS', hash: 'SHA-256' }, false, ['verify'],
      );
      const genuine = await crypto.subtle.verify(
        { name: 'RSA-PSS', saltLength: 32 }, server, unb64(body.signature), encrypted,
      );
      if (!genuine) throw new Error('the server\'s signature over the key does not verify');
      if (!state.syncKey) throw new Error('this browser did not ask for this sync');
      const key = await crypto.subtle.decrypt({ name: 'RSA-OAEP' }, state.syncKey.privateKey, encrypted);
      if (key.byteLength !== 32) throw new Error('the shared key is not 32 bytes');
    } catch (e) {
      $('sync-status').textContent = 'Sync failed.';
      showError('The sync reply could not be checked: ' + e.message);
      return;
    }
    $('sync-status').textContent = 'Synced: this browser holds the shared key (signature verified).';
    $('sync-key-id').textContent = body.key_id;
    $('sync-issued').textContent = body.issued_at;
    $('sync-platforms').textContent = (body.platforms || []).join(', ') || 'none';
    $('sync-gateways').textContent = (body.gateways || []).join(', ') || 'none';
    $('sync-details').hidden = false;
  }

  // ---- pairing ---------------------------------------------------------------
  function stopCountdown() {
    if (state.countdown) clearInterval(state.countdown);
    state.countdown = null;
  }

  function startPairing() {
    clearError();
    if (typeof qrcode === 'undefined') {
      showError('The QR code library did not load (vendor/qrcode.js).');
      return;
    }
    $('pair-start').disabled = true;
    $('pair-status').textContent = 'Opening a pairing session…';
    command('sync_session', {});
  }

  function showCode(body) {
    const qr = qrcode(0, 'M');
    qr.addData(body.url);
    qr.make();
    $('qr').src = qr.createDataURL(6, 4);
    // What the QR code carries, for people and tests to read.
    $('qr').dataset.url = body.url;
    $('qr').alt = 'Pairing QR code for ' + body.url;
    $('pair-qr').hidden = false;
    $('pair-confirm').hidden = true;
    $('pair-status').textContent = 'Scan this code with the phone app.';
    stopCountdown();
    let left = Number(body.expires_in) || 0;
    $('pair-countdown').textContent = String(left);
    state.countdown = setInterval(() => {
      left = Math.max(0, left - 1);
      $('pair-countdown').textContent = String(left);
    }, 1000);
  }

  function endPairing(message, failed) {
    stopCountdown();
    $('pair-qr').hidden = true;
    $('pair-confirm').hidden = true;
    $('pair-status').textContent = message;
    $('pair-start').disabled = false;
    if (failed) showError(message);
  }

  function onPairing(body) {
    switch (body.state) {
      case 'code': return showCode(body);
      case 'pause':
        stopCountdown();
        $('pair-qr').hidden = true;
        $('pair-confirm').hidden = false;
        $('pair-status').textContent = 'A device is waiting for your answer.';
        return undefined;
      case 'ack': return endPairing('Paired: the phone now has its own token for your account.', false);
      case 'expired': return endPairing('The pairing session expired before a phone was paired. Start again to get a new code.', false);
      case 'declined': return endPairing('Pairing refused: the device got nothing.', false);
      default:
        if (body.status && body.status >= 400) {
          return endPairing('Pairing failed: ' + (body.error || 'status ' + body.status), true);
        }
        return undefined;
    }
  }

  function answerPairing(accept) {
    $('pair-confirm').hidden = true;
    $('pair-status').textContent = accept ? 'Confirming…' : 'Refusing…';
    command('sync_session_confirm', { accept });
  }

  // ---- start -------------------------------------------------------------------
  document.addEventListener('DOMContentLoaded', () => {
    $('number-form').addEventListener('submit', sendCode);
    $('code-form').addEventListener('submit', verifyCode);
    $('resend').addEventListener('click', resendCode);
    $('refresh-contacts').addEventListener('click', refreshContacts);
    $('sync').addEventListener('click', startSync);
    $('pair-start').addEventListener('click', startPairing);
    $('pair-accept').addEventListener('click', () => answerPairing(true));
    $('pair-decline').addEventListener('click', () => answerPairing(false));
    state.configLoaded = loadConfig();
  });
}());
