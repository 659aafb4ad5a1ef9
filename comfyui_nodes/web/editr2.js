// Shows the operative intent on each Edit-R2 Edit Turn node after it runs (the node's `ui.text` output), labelled,
// and keeps it in the workflow (node properties), so it is still there after a page reload. ComfyUI re-sends an
// output node's display when it is cached, so a re-queue shows it too; the turn's image preview comes with it.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOWS_TEXT = new Set(["EditR2EditTurn", "EditR2SaveSession"]);
const SHOWN = "editr2_shown_text"; // node property holding the last shown text

function labelled(nodeName, text) {
  return nodeName === "EditR2EditTurn" ? `Intent:\n${text}` : text;
}

app.registerExtension({
  name: "editr2.ShowIntent",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets["STRING"](this, "shown_text", ["STRING", { multiline: true }], app).widget;
      widget.label = nodeData.name === "EditR2EditTurn" ? "intent" : "saved";
      widget.element.readOnly = true;
      widget.element.placeholder =
        nodeData.name === "EditR2EditTurn" ? "Intent: shown here after the turn runs" : "";
      widget.serialize = false; // display only: not part of the widget values or the prompt
      widget.options = { ...(widget.options || {}), serialize: false };
    };

    const show = (node, text) => {
      const widget = node.widgets?.find((w) => w.name === "shown_text");
      if (widget) widget.value = labelled(nodeData.name, text);
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!message?.text) return;
      const text = message.text.join("\n");
      this.properties = this.properties || {};
      this.properties[SHOWN] = text;
      show(this, text);
      // record the change now, so the browser's saved copy of the workflow (restored on reload) holds the text
      app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      const text = this.properties?.[SHOWN];
      if (text) show(this, text);
    };
  },
});
