// The demo shop's pages: build a view from a snapshot or from localStorage,
// then apply the events that arrive through one EventSource. No page applies
// its own actions: it posts them, and they come back as events like everyone
// else's, so every tab shows the same thing.
"use strict";

const PAGE = document.body.dataset.page; // "shop" or "admin"
const STORE = "eventlog-demo:" + PAGE;
const IDENTITY = "eventlog-demo:identity"; // written on sign-in and sign-out, read by the other tabs
const RESTART_DELAY = 2000; // ms before starting over when the server rejected the stream or is down

// Exposed for the browser tests and for curious people with a console.
const demo = window.eventlogDemo = {
  state: null, shopper: null, topics: [], eventTypes: [], logId: null, source: null,
  status: "connecting", resumedFrom: null, applied: 0, errors: 0, starts: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value != null) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

// -- talking to the server --------------------------------------------------------------

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
    credentials: "same-origin",
  });
  const answer = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(answer.error || "request failed: " + response.status);
  return answer;
}

async function act(path, body) {
  try {
    showMessage("");
    return await call("POST", "/api/" + path, body || {});
  } catch (error) {
    showMessage(error.message);
    return null;
  }
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// -- starting: a view, then the stream ---------------------------------------------------

let restartTimer = null;

async function start() {
  clearTimeout(restartTimer);
  demo.starts += 1;
  closeSource();
  setStatus("connecting");
  try {
    const identity = await call("GET", "/api/whoami");
    const saved = loadSaved();
    if (saved && saved.logId === identity.log_id && saved.shopper === shopperKey(identity.shopper)) {
      adopt(identity, saved.state, "storage");
    } else {
      const snapshot = await call("GET", "/api/state");
      adopt(snapshot, fromSnapshot(snapshot), "snapshot");
      save();
    }
  } catch (error) {
    setStatus("offline");
    restartTimer = setTimeout(start, RESTART_DELAY);
    return;
  }
  render();
  connect();
}

function adopt(identity, state, origin) {
  demo.shopper = identity.shopper;
  demo.topics = PAGE === "admin" ? identity.topics.filter((t) => !t.startsWith("shop:cart:")) : identity.topics;
  demo.logId = identity.log_id;
  demo.eventTypes = identity.event_types;
  demo.state = state;
  demo.resumedFrom = origin;
}

function fromSnapshot(snapshot) {
  return {
    lastEventId: snapshot.last_event_id,
    cart: snapshot.cart,
    products: snapshot.products,
    categories: snapshot.categories,
    recent: [],
  };
}

function shopperKey(shopper) {
  return PAGE === "admin" ? "admin" : shopper.session_id + "/" + (shopper.user_id || "");
}

function loadSaved() {
  try {
    return JSON.parse(localStorage.getItem(STORE) || "null");
  } catch (error) {
    return null;
  }
}

function save() {
  const saved = { logId: demo.logId, shopper: shopperKey(demo.shopper), state: demo.state };
  localStorage.setItem(STORE, JSON.stringify(saved));
}

function connect() {
  const query = new URLSearchParams();
  for (const topic of demo.topics) query.append("topic", topic);
  // Only for this first connection: when EventSource reconnects by itself, it
  // repeats this URL and sends the id of the last event it got in the
  // Last-Event-ID header, which the server prefers.
  query.set("last_event_id", String(demo.state.lastEventId));
  const source = new EventSource("/events?" + query);
  source.onopen = () => setStatus("live");
  source.onerror = () => {
    demo.errors += 1;
    if (source.readyState === EventSource.CLOSED) {
      // The server responded with an error status (a cookie changed, say): start over.
      setStatus("closed");
      restartTimer = setTimeout(start, RESTART_DELAY);
    } else {
      setStatus("reconnecting");
    }
  };
  // Each SSE message is named after its event's type; EventSource dispatches
  // named messages only to listeners of that name.
  for (const type of demo.eventTypes) source.addEventListener(type, onEvent);
  demo.source = source;
}

function closeSource() {
  if (demo.source) demo.source.close();
  demo.source = null;
}

function setStatus(status) {
  demo.status = status;
  const badge = $("status");
  badge.textContent = status;
  badge.className = "status " + status;
}

// -- applying events ----------------------------------------------------------------------

function onEvent(message) {
  const event = JSON.parse(message.data);
  const state = demo.state;
  if (event.id <= state.lastEventId) return; // already in the view
  const changedShopper = apply(state, event);
  state.lastEventId = event.id;
  state.recent = [{ id: event.id, type: event.type }, ...state.recent].slice(0, 20);
  demo.applied += 1;
  save();
  scheduleRender();
  if (changedShopper) start(); // signed in in another tab: follow the new cart
}

// Returns true when the event shows that this browser's shopper signed in elsewhere.
function apply(state, event) {
  const data = event.data;
  const products = state.products;
  const categories = state.categories;
  if (data.cart) return applyCart(state, data.cart);
  switch (event.type.replace(/^shop\./, "")) {
    case "product_created":
    case "product_updated":
      products[data.product.id] = data.product;
      break;
    case "product_deleted":
      delete products[data.product_id];
      break;
    case "products_bulk_status_changed":
      for (const id of data.product_ids) if (products[id]) products[id].status = data.status;
      break;
    case "inventory_updated":
      if (products[data.product_id]) products[data.product_id].stock += data.stock_change;
      break;
    case "category_created":
    case "category_updated":
      categories[data.category.id] = data.category;
      break;
    case "category_deleted":
      delete categories[data.category_id];
      break;
    case "categories_bulk_deleted":
      for (const id of data.category_ids) delete categories[id];
      break;
    case "categories_bulk_parent_changed":
      for (const id of data.category_ids) if (categories[id]) categories[id].parent_id = data.parent_id;
      break;
    case "categories_bulk_status_changed":
      for (const id of data.category_ids) if (categories[id]) categories[id].status = data.status;
      break;
  }
  return false;
}

function applyCart(state, cart) {
  const shopper = demo.shopper;
  if (!shopper) return false;
  if (shopper.user_id) {
    if (cart.user_id === shopper.user_id) state.cart = cart;
    return false; // the guest cart it came from, emptied after a merge
  }
  if (cart.session_id !== shopper.session_id) return false;
  if (cart.user_id) return true;
  state.cart = cart;
  return false;
}

// -- rendering ------------------------------------------------------------------------------

let renderPending = false;

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  if (!demo.state) return;
  $("last-event-id").textContent = String(demo.state.lastEventId);
  if (PAGE === "shop") renderShop();
  else renderAdmin();
}

function sortedProducts() {
  return Object.values(demo.state.products).sort((a, b) => a.name.localeCompare(b.name));
}

function categoryName(id) {
  const category = id == null ? null : demo.state.categories[id];
  return category ? category.name : "";
}

function statusBadge(status) {
  return status && status !== "active" ? el("span", { class: "badge " + status }, status) : "";
}

function renderShop() {
  const shopper = demo.shopper;
  $("shopper-name").textContent = shopper.user_id ? "Signed in as " + shopper.user_id : "Guest";
  $("sign-in").hidden = Boolean(shopper.user_id);
  $("sign-out").hidden = !shopper.user_id;

  const rows = sortedProducts()
    .filter((p) => p.status !== "hidden" && p.status !== "archived")
    .map((p) => el("tr", { dataset: { productId: p.id }, "data-testid": "product" },
      el("td", {}, p.name, statusBadge(p.status)),
      el("td", {}, categoryName(p.category_id)),
      el("td", { class: "num" }, p.price),
      el("td", { class: "num", "data-testid": "stock" }, String(p.stock)),
      el("td", { class: "num" }, el("button", {
        "data-testid": "add", disabled: p.stock <= 0,
        onclick: () => act("cart/add", { product_id: p.id, quantity: 1 }),
      }, "Add"))));
  $("products").replaceChildren(...rows);

  const cart = demo.state.cart;
  const items = cart ? cart.items : [];
  $("cart-items").replaceChildren(...items.map((item) => el("li",
    { dataset: { itemId: item.id, productId: item.product_id }, "data-testid": "cart-item" },
    el("span", { class: "name" }, item.name),
    el("button", { class: "small", "aria-label": "one less", "data-testid": "less",
      onclick: () => act("cart/quantity", { item_id: item.id, quantity: item.quantity - 1 }) }, "−"),
    el("span", { class: "qty", "data-testid": "quantity" }, String(item.quantity)),
    el("button", { class: "small", "aria-label": "one more", "data-testid": "more",
      onclick: () => act("cart/quantity", { item_id: item.id, quantity: item.quantity + 1 }) }, "+"),
    el("span", { class: "num" }, item.total))));
  $("cart-empty").hidden = items.length > 0;
  $("cart-total").textContent = cart ? cart.total : "0.00";
  $("checkout").disabled = items.length === 0;
  $("clear-cart").disabled = items.length === 0;
}

const STATUSES = ["active", "sale", "featured", "hidden"];

function renderAdmin() {
  const body = $("admin-products");
  const rows = new Map([...body.children].map((row) => [row.dataset.productId, row]));
  for (const product of sortedProducts()) {
    const row = rows.get(String(product.id)) || adminRow(product);
    updateAdminRow(row, product);
    body.append(row); // moves it into sorted order
    rows.delete(String(product.id));
  }
  for (const row of rows.values()) row.remove();

  const categories = Object.values(demo.state.categories).sort((a, b) => a.name.localeCompare(b.name));
  $("admin-categories").replaceChildren(...categories.map((c) => el("li",
    { dataset: { categoryId: c.id }, "data-testid": "category" },
    el("span", { class: "name" }, c.name, statusBadge(c.status)),
    el("button", { class: "small", "data-testid": "delete-category",
      onclick: () => act("admin/categories/" + encodeURIComponent(c.id) + "/delete") }, "delete"))));

  const select = document.querySelector("#new-product select");
  if (document.activeElement !== select) {
    const current = select.value;
    select.replaceChildren(el("option", { value: "" }, "no category"),
      ...categories.map((c) => el("option", { value: c.id }, c.name)));
    select.value = current;
  }
  $("events").replaceChildren(...demo.state.recent.map((e) => el("li", {}, "#" + e.id + " " + e.type)));
}

function adminRow(product) {
  const id = encodeURIComponent(product.id);
  const price = el("input", { size: 7, "aria-label": "price", "data-testid": "price" });
  const status = el("select", { "aria-label": "status", "data-testid": "status",
    onchange: () => act("admin/products/" + id + "/update", { status: status.value }) },
    ...STATUSES.map((s) => el("option", { value: s }, s)));
  const stockButton = (change, label) => el("button", { class: "small", "data-testid": "stock" + label,
    onclick: () => act("admin/products/" + id + "/stock", { change }) }, label);
  return el("tr", { dataset: { productId: product.id }, "data-testid": "product" },
    el("td", { class: "name" }),
    el("td", { class: "category" }),
    el("td", {}, status),
    el("td", { class: "num" }, price, " ", el("button", { class: "small", "data-testid": "save-price",
      onclick: () => act("admin/products/" + id + "/update", { price: price.value }) }, "save")),
    el("td", { class: "num" }, el("span", { "data-testid": "stock" }), " ",
      stockButton(-1, "−1"), stockButton(1, "+1"), stockButton(10, "+10")),
    el("td", {}, el("button", { class: "small", "data-testid": "delete",
      onclick: () => act("admin/products/" + id + "/delete") }, "delete")));
}

function updateAdminRow(row, product) {
  row.querySelector(".name").textContent = product.name;
  row.querySelector(".category").textContent = categoryName(product.category_id);
  row.querySelector("span[data-testid=stock]").textContent = String(product.stock);
  const price = row.querySelector("input[data-testid=price]");
  if (document.activeElement !== price) price.value = product.price;
  const status = row.querySelector("select[data-testid=status]");
  if (document.activeElement !== status) status.value = product.status;
}

// -- the forms ------------------------------------------------------------------------------

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

function wireForms() {
  if (PAGE === "shop") {
    $("sign-in").addEventListener("submit", async (event) => {
      event.preventDefault();
      if (await act("sign-in", formValues(event.target))) identityChanged();
    });
    $("sign-out").addEventListener("click", async () => {
      if (await act("sign-out")) identityChanged();
    });
    $("checkout").addEventListener("click", () => act("cart/checkout"));
    $("clear-cart").addEventListener("click", () => act("cart/clear"));
  } else {
    $("new-product").addEventListener("submit", async (event) => {
      event.preventDefault();
      if (await act("admin/products", formValues(event.target))) event.target.reset();
    });
    $("new-category").addEventListener("submit", async (event) => {
      event.preventDefault();
      if (await act("admin/categories", formValues(event.target))) event.target.reset();
    });
  }
}

function identityChanged() {
  localStorage.setItem(IDENTITY, String(Date.now()));
  start();
}

window.addEventListener("storage", (event) => {
  if (event.key === IDENTITY) start(); // another tab signed in or out
});

wireForms();
start();
