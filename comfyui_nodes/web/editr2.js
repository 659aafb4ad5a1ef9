// Shows the operative intent on each Edit-R2 Edit Turn node after it runs (the node's `ui.text` output).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOWS_TEXT = new Set(["EditR2EditTurn", "EditR2SaveSession"]);

app.registerExtension({
  name: "editr2.ShowIntent",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets["STRING"](this, "shown_text", ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.element.placeholder = nodeData.name === "EditR2EditTurn" ? "operative intent (after a run)" : "";
      widget.serialize = false; // display only: not part of the workflow or the prompt
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "shown_text");
      if (widget && message?.text) widget.value = message.text.join("\n");
    };
  },
});
